"""`predict`: apply a logged or registered model to a data file; predictions per sample, and the metrics
when the file has labels.

What loading trusts: the models are stored in MLflow's pickle format (see `train._log_model`), and
unpickling runs whatever code the file names. `predict` allows pickle loading
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION) for the moment it loads a model, unless the user set that
variable (false: then it cannot load, and says so): load models from a tracking store that you, or
people you trust, wrote to; never from a folder someone sent you. The data file, in contrast, is read
with the restricted unpickler of `msa.data`, like everywhere.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from msa.data import MOSIData
from msa.metrics import eval_mosi_regression
from msa.training import predict
from pipelines import tracking
from pipelines.registry import describe_tags, logged_model_id
from pipelines.stages.predict_options import SPLITS, URI_FORMS
from pipelines.store_check import read_client

PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


class PredictError(ValueError):
    """A model that cannot be found or does not fit the data; the message is one line."""


@dataclass
class Predictions:
    table: pd.DataFrame                  # id[, split], prediction[, label]: one row per sample
    metrics: dict[str, dict[str, float]]  # split -> eval_mosi_regression, for the splits with labels
    model: str                           # the model as resolved, and what it is
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FoundModel:
    asked: str                   # the --model the user gave
    uri: str                     # a URI MLflow loads
    described: str               # a line saying what the model is
    run_id: str | None           # the run that logged it, if it came from a store
    client: MlflowClient | None  # on that store


def find_model(model_uri: str) -> FoundModel:
    """The model `--model` names, found before any data is loaded: a model folder needs no store, a
    models:/ or runs:/ URI one that can be read (a StoreError or PredictError when not)."""
    client = read_client() if model_uri.startswith(("models:/", "runs:/")) else None
    return FoundModel(model_uri, *resolve(model_uri, client), client)


def resolve(uri: str, client: MlflowClient | None) -> tuple[str, str, str | None]:
    """(a URI MLflow loads, a line saying what the model is, its run id or None) for `uri`; `client`
    (a store's) is needed for models:/ and runs:/ URIs.

    `runs:/<id>/model` keeps working for runs logged since models are named `<ablation>-seed-<n>`:
    it is taken as the run's one logged model."""
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        try:
            if ref.startswith("m-") and "/" not in ref and "@" not in ref:
                model = client.get_logged_model(ref)
                return uri, f"{uri} (logged model {model.name})", model.source_run_id
            name, sep, alias = ref.partition("@")
            if sep:
                version = client.get_model_version_by_alias(name, alias)
            elif ref.endswith("/latest"):  # the newest version, as MLflow's own URIs mean it
                name = ref.removesuffix("/latest")
                found = client.search_model_versions(f"name = '{name}'") if "'" not in name else []
                version = max(found, key=lambda v: int(v.version), default=None)
            else:
                version = client.get_model_version(*ref.split("/", 1))
        except (MlflowException, TypeError):  # TypeError: no '/' between name and version
            version = None
        if version is None:
            raise PredictError(f"--model {uri}: no such model in {client.tracking_uri} (expected {URI_FORMS})")
        return (f"models:/{version.name}/{version.version}",
                f"{uri} = version {version.version} ({describe_tags(version.tags)})", version.run_id)
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise PredictError(f"--model {uri}: no run '{run_id}' in {client.tracking_uri}") from None
        named = client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{path}'"
                                            ) if path and "'" not in path else []
        if any(m.source_run_id == run_id for m in named):
            return uri, f"{uri} ({run.info.run_name})", run_id
        model_id = logged_model_id(client, run) if path in ("model", "") else None
        if model_id is None:
            raise PredictError(f"--model {uri}: run '{run_id}' has no logged model named '{path}'")
        return f"models:/{model_id}", f"{uri} ({run.info.run_name}, logged model {model_id})", run_id
    path = Path(uri)
    if (path / "MLmodel").is_file():
        return str(path.resolve()), f"{path} (a model folder)", None
    raise PredictError(f"--model {uri}: not a model URI or a folder with an MLmodel file (expected {URI_FORMS})")


def signature_dims(uri: str) -> dict[str, int]:
    """modality -> features per step, from the model's input signature (in the order it takes them)."""
    try:  # a model folder's own MLmodel: get_model_info would look its model id up in a tracking store
        signature = (mlflow.models.Model.load(uri) if Path(uri).is_dir() else mlflow.models.get_model_info(uri)
                     ).signature
    except (MlflowException, OSError) as e:
        raise PredictError(f"--model {uri}: cannot read the model ({str(e).splitlines()[0]})") from None
    if signature is None or signature.inputs is None:
        raise PredictError(f"--model {uri}: the model has no input signature, so its dims cannot be checked")
    return {spec.name: int(spec.shape[-1]) for spec in signature.inputs.inputs}


def check_dims(model_dims: dict[str, int], data: MOSIData) -> None:
    """The file must hold every modality the model takes, with as many features per step."""
    wrong = [f"{m} {d} (model) vs {data.dims.get(m, 'missing')} (file)" for m, d in model_dims.items()
             if data.dims.get(m) != d]
    if wrong:
        raise PredictError(f"{data.source}: its features do not fit the model: features per step of "
                           + "; ".join(wrong))


@contextmanager
def _pickle_allowed():
    """Pickle loading allowed while the model loads, unless the user set PICKLE_ENV (false: their choice)."""
    before = os.environ.get(PICKLE_ENV)
    if before is not None:
        yield
        return
    os.environ[PICKLE_ENV] = "true"
    try:
        yield
    finally:
        os.environ.pop(PICKLE_ENV, None)


def predict_data(found: FoundModel, data: MOSIData, split: str = "test", batch_size: int = 256) -> Predictions:
    """Load the model, check its dims against the data, predict every sample of `split` (or all)."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    uri = found.uri
    names = list(data.splits) if split == "all" else [split]
    missing = [n for n in names if n not in data.splits]
    if missing:
        raise PredictError(f"{data.source}: no split '{missing[0]}' in it (it has {list(data.splits)}; "
                           f"use --split {'|'.join(data.splits)}|all)")
    check_dims(signature_dims(uri), data)
    try:
        with _pickle_allowed():
            model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError, ModuleNotFoundError) as e:
        raise PredictError(f"--model {found.asked}: cannot load it ({str(e).splitlines()[0]})") from None

    frames, metrics, undefined = [], {}, []
    for name in names:
        part = data[name]
        pred = predict(model, part, batch_size=batch_size)
        frame = pd.DataFrame({"id": part.ids, "split": name, "prediction": pred})
        if part.has_labels:
            frame["label"] = part.labels.numpy()
            with warnings.catch_warnings():  # said once, in the notes, in words a user reads
                warnings.filterwarnings("ignore", message="Corr is undefined", category=RuntimeWarning)
                metrics[name] = eval_mosi_regression(pred, part.labels)
            if math.isnan(metrics[name]["Corr"]):
                undefined.append(name)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if split != "all":
        table = table.drop(columns="split")
    if "label" in table and table["label"].isna().any():  # some splits labelled, some not: blanks, and
        # labels as written (2.4, not the float32's 2.4000000953674316)
        table["label"] = table["label"].map("{:.7g}".format).where(table["label"].notna(), "")
    if data.synthetic:  # the file travels alone: every row says what its figures come from
        table["data"] = "SYNTHETIC (not a MOSI result)"
    notes = _notes(found, data, names)
    if undefined:
        notes.append(f"note: Corr is undefined (nan) on {' and '.join(undefined)}: its labels or the model's "
                     "predictions are all the same value")
    return Predictions(table, metrics, found.described, notes)


def _notes(found: FoundModel, data: MOSIData, splits: list[str]) -> list[str]:
    """What a person should know to read the numbers: data the model was trained or selected on."""
    if found.run_id is None or found.client is None:
        return []
    try:
        tags = found.client.get_run(found.run_id).data.tags
    except MlflowException:
        return []
    notes = []
    seen = [s for s in splits if s in ("train", "valid")]
    if tags.get("data_digest") == data.digest and seen:
        notes.append(f"note: the model was trained on this data; its {' and '.join(seen)} scores are not held "
                     "out (train fitted it, valid chose its checkpoint); only test is")
    if tags.get("synthetic") == "true" and not data.synthetic:
        notes.append("note: the model was trained on SYNTHETIC data (not MOSI): these are that model's scores, "
                     "not those of a model trained on MOSI")
    logged, here = tags.get("code_version"), tracking.code_version()
    if logged and logged != here:
        notes.append(f"note: the model's run recorded code {logged}, this checkout is {here}: predict runs this "
                     "checkout's msa code (mlflow.pytorch.load_model in a fresh Python runs the model's own)")
    return notes


__all__ = ["SPLITS", "PredictError", "Predictions", "FoundModel", "find_model", "resolve", "signature_dims",
           "check_dims", "predict_data"]
