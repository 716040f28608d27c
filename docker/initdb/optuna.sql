-- Run once by the postgres image on an empty volume: the study storage that `tune --storage
-- postgresql://mlflow:mlflow@db/optuna` uses (the image creates only POSTGRES_DB, the tracking store).
CREATE DATABASE optuna;
