"""The library packages stand without the services: importing any of their modules loads
neither Ray nor MLflow, so a user of the GAN library, the dataset tool or the metrics
installs and waits for neither."""

from __future__ import annotations

import json
import subprocess
import sys

from services import ROOT

# Walked, not listed, so a module added or split off is checked too.
LIBRARY_PACKAGES = ("gan.core", "gan.data", "gan.evaluation")
LIBRARY_MODULES = ("gan.sweeps.space", "gan.sweeps.plan", "gan.sweeps.population")
SERVICES = ("ray", "mlflow")

SCRIPT = f"""
import importlib, json, pkgutil, sys

imported = []
for name in {LIBRARY_PACKAGES!r}:
    package = importlib.import_module(name)
    imported.append(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(module.name)
        imported.append(module.name)
for name in {LIBRARY_MODULES!r}:
    importlib.import_module(name)
    imported.append(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SERVICES!r})
print(json.dumps({{"imported": imported, "loaded": loaded}}))
"""


def test_library_modules_import_neither_ray_nor_mlflow():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["imported"]) > len(LIBRARY_PACKAGES) + len(LIBRARY_MODULES)  # the walk found modules
    assert result["loaded"] == [], f"a library module imports {result['loaded'][:10]}"
