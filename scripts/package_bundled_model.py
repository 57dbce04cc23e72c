"""Turn a trained checkpoint into the bundled model: fp16 weights + its held-out test metrics.

    python scripts/package_bundled_model.py runs/bundled/her2st_hifusion.pt \
        --test runs/bundled/C4.eval.json --test-section C4

The test metrics (from ``hifusion evaluate --json`` on a section the model never saw) go into
the model card beside the validation metrics, so ``hifusion info`` shows both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hifusion_model.checkpoint import bundled_model_path, load_model, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="trained checkpoint (fp32)")
    parser.add_argument("--test", type=Path, required=True, help="hifusion evaluate --json output")
    parser.add_argument("--test-section", required=True, help="name of the held-out section")
    parser.add_argument("--out", type=Path, default=bundled_model_path())
    args = parser.parse_args()

    model, ckpt = load_model(args.model)
    test = json.loads(args.test.read_text())
    card = dict(ckpt.card)
    card["test"] = {"section": args.test_section, "metrics": test}
    card["notes"] = (
        f"Bundled HER2ST model. Trained on {', '.join(card.get('data', []))}; "
        f"section {args.test_section} was never seen in training or model selection and is "
        "the packaged sample, so the demo shows a prediction, not a memory."
    )
    out = save_checkpoint(args.out, model, train_mean=ckpt.train_mean, card=card, half=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, fp16 weights)")


if __name__ == "__main__":
    main()
