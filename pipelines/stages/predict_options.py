"""What `predict` accepts, apart from the stage's own module (which imports torch and MLflow), so that
the command line is parsed without them."""

SPLITS = ("train", "valid", "test", "all")
URI_FORMS = ("models:/NAME@ALIAS, models:/NAME/VERSION (or /latest), models:/MODEL_ID, runs:/RUN_ID/model or a "
             "model folder")

__all__ = ["SPLITS", "URI_FORMS"]
