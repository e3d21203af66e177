"""Small examples to copy from: `my_model.py` is the model class `configs/own_model.yaml` trains."""
