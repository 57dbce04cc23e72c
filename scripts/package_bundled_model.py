"""Turn a trained checkpoint into the bundled model: fp16 weights + its held-out test metrics.

    python scripts/package_bundled_model.py runs/bundled/her2st_hifusion.pt \
        --test runs/bundled/C4.eval.json --test-section C4

The test metrics (from ``hifusion evaluate --json`` on a section the model never saw) go into
the model card beside the validation metrics, so ``hifusion info`` shows both. A model trained
before the per-spot uncertainty existed gets its noise model fitted on its training sections
(``--noise-sections``; the weights are unchanged, fp16 to fp32 and back is exact)::

    python scripts/package_bundled_model.py bundled --noise-sections B4.h5ad C2.h5ad C3.h5ad
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.inference.uncertainty import fit_on_sections
from hifusion_model.models.checkpoint import bundled_model_path, load_model, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="trained checkpoint (fp32)")
    parser.add_argument("--test", type=Path, help="hifusion evaluate --json output (default: "
                        "keep the card's)")
    parser.add_argument("--test-section", help="name of the held-out section")
    parser.add_argument("--noise-sections", type=Path, nargs="+", metavar="SECTION.h5ad",
                        help="fit the uncertainty's noise model on these (the training sections)")
    parser.add_argument("--out", type=Path, default=bundled_model_path())
    args = parser.parse_args()

    model, ckpt = load_model(args.model)
    card = dict(ckpt.card)
    if args.test:
        test = json.loads(args.test.read_text())
        card["test"] = {"section": args.test_section, "metrics": test}
    section = card["test"]["section"]
    card["notes"] = (
        f"Bundled HER2ST model. Trained on {', '.join(card.get('data', []))}; "
        f"section {section} was never seen in training or model selection and is "
        "the packaged sample, so the demo shows a prediction, not a memory."
    )
    if args.noise_sections:
        sections = [read_section(p) for p in args.noise_sections]
        slides = [section_slide(s) for s in sections]
        card["noise_model"] = fit_on_sections(list(zip(sections, slides)), ckpt.config).to_dict()
        for slide in slides:
            slide.close()
    out = save_checkpoint(args.out, model, train_mean=ckpt.train_mean, card=card, half=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, fp16 weights)")


if __name__ == "__main__":
    main()
