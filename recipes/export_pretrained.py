"""Export the study models as the package's pretrained weights (hybridflow/weights/).

Takes seed 0 of every cell of the digits main job (recipes/digits_sweep.py) and of the
Fashion-MNIST study (recipes/fashion_mnist.py) from their run folders, and writes each as
`<dataset>/<backbone>-lam{0,1overD,1}` with its SHA-256 and test metrics in index.json.
Run both studies first. `hybridflow pretrained` lists the result.
"""

import json
import sys
from pathlib import Path

from hybridflow.pretrained import export_pretrained
from hybridflow.runs import MODEL_FILE, run_name

STUDIES = {  # run folder of a study -> dataset name used in the pretrained names
    Path("runs/digits"): "digits",
    Path("runs/fashion_mnist"): "fashion-mnist",
}
RENAME = {"resflow-digits": "resflow"}  # one name per block family across datasets
METRICS = ("accuracy", "bpd", "nll_nats", "ece", "brier", "class_nll")

exported = 0
for root, dataset in STUDIES.items():
    for run in sorted(root.glob("*-s0")):
        evaluation = run / "study_eval.json"
        if not (run / MODEL_FILE).exists() or not evaluation.exists():
            print(f"skip {run}: not finished and evaluated", file=sys.stderr)
            continue
        study = json.loads(evaluation.read_text())
        test = study["test"]
        backbone = RENAME.get(test["backbone"], test["backbone"])
        name = f"{dataset}/{run_name(backbone, test['lam'])}"
        entry = export_pretrained(
            run,
            name,
            metrics={
                **{k: test[k] for k in METRICS if k in test},
                "dequant_samples": study["settings"]["dequant_samples"],  # bits/dim bound draws
            },
            source=f"{run} (recipes/{'digits_sweep' if dataset == 'digits' else 'fashion_mnist'}"
            ".py, seed 0)",
        )
        exported += 1
        print(f"{name}: {entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256'][:12]}…")
print(f"{exported} models exported")
