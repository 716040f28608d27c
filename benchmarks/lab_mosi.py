"""The lab's plain MOSI training script (from the seed), the reference the project is timed against.

Its code is the lab's: read the pickle, train the LSTM baseline with Adam + cosine, keep the best epoch
on validation Corr, reload it and test. Only the data path, epochs and checkpoint folder became
arguments, prints are kept as the lab has them, and `eval_mosi_regression` is the project's MMSA-exact
copy (the lab imports MMSA's). Run it as a whole process, as the lab does:

    python benchmarks/lab_mosi.py DATA.pkl [--epochs 20] [--checkpoint-dir .]
"""

import argparse
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The lab's eval_mosi_regression is MMSA's, whose module imports these: the lab's process pays for them.
from sklearn.metrics import accuracy_score, f1_score  # noqa: F401
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msa.metrics import eval_mosi_regression  # MMSA's numbers, from numpy alone


class MOSIDataset(Dataset):
    def __init__(self, data_path, split='train', raw=None):
        # Load the data from the pickle file (`raw`: already loaded, for the in-process benchmark)
        if raw is None:
            with open(data_path, 'rb') as f:
                raw = pickle.load(f)
        data = raw
        self.vision = data[split]['vision']
        self.text = data[split]['text']
        self.audio = data[split]['audio'].copy()
        self.labels = data[split]['labels']
        self.ids = data[split]['id']
        self.audio[self.audio == float('inf')] = 0.0
        self.audio[self.audio == float('-inf')] = 0.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        vision = torch.tensor(self.vision[idx], dtype=torch.float32)
        text = torch.tensor(self.text[idx], dtype=torch.float32)
        audio = torch.tensor(self.audio[idx], dtype=torch.float32)
        label = torch.tensor(self.labels[idx], dtype=torch.float32).squeeze()
        return vision, text, audio, label


class MultimodalSentimentAnalysisModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_norm = nn.LayerNorm(35)
        self.text_norm = nn.LayerNorm(300)
        self.audio_norm = nn.LayerNorm(74)
        self.vision_fc = nn.Linear(35, 128)
        self.text_fc = nn.Linear(300, 128)
        self.audio_fc = nn.Linear(74, 128)
        # dropout=0.1 in the lab; it is a no-op for one layer and only warns, so it is left out here.
        self.vision_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, batch_first=True)
        self.text_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, batch_first=True)
        self.audio_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, batch_first=True)
        self.mm_lstm = nn.LSTM(input_size=128, hidden_size=128, num_layers=1, batch_first=True)
        self.fc = nn.Linear(128, 1)

    def forward(self, vision, text, audio):
        vision = self.vision_norm(vision)
        text = self.text_norm(text)
        audio = self.audio_norm(audio)
        vision = F.relu(self.vision_fc(vision))
        text = F.relu(self.text_fc(text))
        audio = F.relu(self.audio_fc(audio))
        _, (vision_h, _) = self.vision_lstm(vision)
        _, (text_h, _) = self.text_lstm(text)
        _, (audio_h, _) = self.audio_lstm(audio)
        feature = (vision_h[-1] + text_h[-1] + audio_h[-1]).unsqueeze(1)
        _, (fusion_tensor, _) = self.mm_lstm(feature)
        output = self.fc(fusion_tensor[-1])
        output = torch.sigmoid(output)
        output = output * 6 - 3
        return output


def train_epoch(model, train_loader, criterion, optimizer, scheduler, device):
    """One epoch of the lab's train_model loop; returns the mean batch loss it prints."""
    model.train()
    running_loss = 0.0
    for vision, text, audio, labels in train_loader:
        vision, text, audio, labels = vision.to(device), text.to(device), audio.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(vision, text, audio)
        loss = criterion(outputs.view(-1), labels.view(-1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        running_loss += loss.item()
    return running_loss / len(train_loader)


def validate_model(model, valid_loader, criterion, device, verbose=True):
    model.eval()
    valid_loss = 0.0
    all_preds = []
    all_labels = []
    with torch.no_grad():
        for vision, text, audio, labels in valid_loader:
            vision, text, audio, labels = vision.to(device), text.to(device), audio.to(device), labels.to(device)
            outputs = model(vision, text, audio)
            loss = criterion(outputs.squeeze(), labels.squeeze())
            valid_loss += loss.item()
            all_preds.append(outputs)
            all_labels.append(labels)
    all_preds = torch.cat(all_preds, dim=0)
    all_labels = torch.cat(all_labels, dim=0)
    eval_results = eval_mosi_regression(all_preds, all_labels)
    if verbose:
        print(f'Validation Loss: {valid_loss/len(valid_loader):.4f}')
        print(eval_results)
    return eval_results["Corr"]


def train_model(model, train_loader, valid_loader, criterion, optimizer, scheduler, device, epochs, checkpoint):
    model.to(device)
    best_corr = 0.
    best_epoch = 0
    for epoch in range(epochs):
        loss = train_epoch(model, train_loader, criterion, optimizer, scheduler, device)
        print(f'Epoch [{epoch+1}/{epochs}], Loss: {loss:.4f}')
        val_corr = validate_model(model, valid_loader, criterion, device)
        if val_corr > best_corr:
            best_corr = val_corr
            best_epoch = epoch
            torch.save(model.state_dict(), checkpoint)
    print(f"Best model saved with val_corr {best_corr} at epoch {best_epoch}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_path")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--checkpoint-dir", default=".")
    args = parser.parse_args(argv)

    seed = 42
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
    device = torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')
    print(device)

    criterion = nn.MSELoss()
    learning_rate = 1e-3
    epochs = args.epochs
    model = MultimodalSentimentAnalysisModel()
    train_dataset = MOSIDataset(args.data_path, split='train')
    valid_dataset = MOSIDataset(args.data_path, split='valid')
    train_loader = DataLoader(train_dataset, batch_size=16, shuffle=True)
    valid_loader = DataLoader(valid_dataset, batch_size=16, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    checkpoint = os.path.join(args.checkpoint_dir, 'best_model.pth')
    train_model(model, train_loader, valid_loader, criterion, optimizer, scheduler, device, epochs, checkpoint)

    model.load_state_dict(torch.load(checkpoint))
    test_dataset = MOSIDataset(args.data_path, split='test')
    test_loader = DataLoader(test_dataset, batch_size=16, shuffle=False)
    print("\n========== test results: ==========\n")
    validate_model(model, test_loader, criterion, device)


if __name__ == "__main__":
    main()
