"""The registered model's code, logged as an MLflow "model from code": MLflow runs this file (with the
model's bundled ``ebm`` and ``pipelines`` sources on the path) to build the pyfunc, so loading a
registered model unpickles nothing (a pickled ``python_model`` would be a cloudpickle blob tied to
the registering process's Python and library versions). The weights are ``model.pt``, loaded with
``torch.load(weights_only=True)``."""
import mlflow

from pipelines.serve.registry import EBMPyfunc

mlflow.models.set_model(EBMPyfunc())
