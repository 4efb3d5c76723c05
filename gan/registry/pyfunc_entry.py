"""The code MLflow runs to load a logged generator (models-from-code: no pickle).

``log_generator`` logs this file as the model's code; loading it (``mlflow models serve``,
``mlflow.pyfunc.load_model``) runs it with the model's bundled ``gan`` package on the path.
"""

import mlflow.models

from gan.registry.models import GeneratorModel

mlflow.models.set_model(GeneratorModel())
