"""CSE849 project 4 deliverables under the course's file names, assembled from the suite's three runs.

    python -m diffusion_lab.cse849 --states <states run> --classifier <states_classifier run> \\
        --guided <states_guided run> --out <folder>

writes the course's submission layout (project handout, section 5.2):
  outputs/uncond_gen_samples.pt          the unconditional run's 5000 samples, a float32 (5000, 2) tensor
  outputs/cond_gen_samples_{0..4}.pt     the guided run's samples of course label k (0 Michigan, 1 Idaho, 2 Ohio,
                                         3 Oklahoma, 4 Wisconsin), matched by state name, so the suite's own
                                         STATES (other label order) lands in the right files too
  outputs/*.png                          the scatter plots, training/validation curves, prediction map
  outputs/scores.json                    the NLLs of the course protocol, read from the runs' results.json
  checkpoints/denoiser.pt, classifier.pt {"state_dict": the net's (EMA) weights, "config": its config}
Every input is read as data (JSON, weights-only torch.load); nothing is written before all inputs check out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from diffusion_lab.build import ConfigError, load_checkpoint, module_state
from diffusion_lab.tasks import read_samples, write_json

COURSE_LABELS = ["Michigan", "Idaho", "Ohio", "Oklahoma", "Wisconsin"]  # the starter code's label order
PLOTS = {  # (run, file in the run dir) -> course deliverable name
    ("states", "samples.png"): "uncond_gen_scatter.png",
    ("states", "loss_curve.png"): "denoiser_training_validation_curves.png",
    ("classifier", "loss_curve.png"): "classifier_training_validation_curves.png",
    ("classifier", "prediction_map.png"): "classifier_prediction_map.png",
    ("guided", "samples_per_class.png"): "cond_gen_scatter_per_state.png",
    ("guided", "samples.png"): "cond_gen_scatter.png",
}


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{path}: not found ({what})")
    return path


def _results(run: Path, key: str) -> dict:
    try:
        return json.loads(_need(run / "results.json", f"the --{key} run's results.json").read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{run / 'results.json'}: not valid JSON ({exc.msg})") from exc


def _net_weights(ckpt_path: Path) -> dict:
    """{"state_dict": net weights (EMA when saved), "config": the net's config} of a suite checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    state, ema = module_state(ckpt, use_ema=True)
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    cfg = ckpt["config"]
    part = cfg.get("model") if cfg.get("model") else cfg.get("classifier")
    return {"state_dict": net, "config": part, "ema": ema, "step": ckpt.get("global_step")}


def cond_samples_by_course_label(samples: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """{course label k: the samples requested for that state}, matching states by name."""
    out = {}
    for k, state in enumerate(COURSE_LABELS):
        if state not in class_names:
            raise ConfigError(f"guided run: no class named {state} among {class_names} (expected the five STATES)")
        rows = labels == class_names.index(state)
        if not bool(rows.any()):
            raise ConfigError(f"guided run: no samples requested for {state} (run it with eval.classes=all)")
        out[k] = samples[rows].float().contiguous()
    return out


def export(states: Path, classifier: Path, guided: Path, out: Path) -> dict:
    """Check every input, then write the deliverables; returns the scores written to scores.json."""
    runs = {"states": states, "classifier": classifier, "guided": guided}
    res = {key: _results(run, key) for key, run in runs.items()}
    uncond, uncond_labels = read_samples(_need(states / "samples.pt", "the --states run's samples.pt"))
    if uncond_labels is not None:
        raise ConfigError(f"{states}/samples.pt: class-requested samples; --states wants the unconditional run")
    cond, cond_labels = read_samples(_need(guided / "samples.pt", "the --guided run's samples.pt"))
    if cond_labels is None:
        raise ConfigError(f"{guided}/samples.pt: no labels; --guided wants a run with eval.classes=all")
    names = list(res["guided"]["protocol"].get("data", {}).get("classes") or [])
    per_label = cond_samples_by_course_label(cond, cond_labels, names)
    denoiser = _net_weights(states / "checkpoints" / "last.ckpt")
    clf = _net_weights(classifier / "checkpoints" / "last.ckpt")
    plots = {name: runs[run] / src for (run, src), name in PLOTS.items()}
    for path in plots.values():
        _need(path, "a plot the run writes")

    (out / "outputs").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(uncond.float().contiguous(), out / "outputs" / "uncond_gen_samples.pt")
    for k, x in per_label.items():
        torch.save(x, out / "outputs" / f"cond_gen_samples_{k}.pt")
    torch.save(denoiser, out / "checkpoints" / "denoiser.pt")
    torch.save(clf, out / "checkpoints" / "classifier.pt")
    for name, src in plots.items():
        shutil.copyfile(src, out / "outputs" / name)
    gm = res["guided"]["metrics"]
    scores = {"uncond_nll": res["states"]["metrics"]["nll"],
              "cond_nll": {f"{k} {s}": gm[f"nll/{s}"] for k, s in enumerate(COURSE_LABELS)},
              "guided_uncond_nll": gm.get("nll"), "classifier_accuracy": res["classifier"]["metrics"].get("accuracy"),
              "protocol": "mean -log pdf under scipy gaussian_kde (default bandwidth) of all true points; "
                          f"{len(uncond)} unconditional samples, {len(per_label[0])} per state",
              "runs": {k: str(v) for k, v in runs.items()}}
    write_json(out / "outputs" / "scores.json", scores)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusion_lab.cse849", description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=Path, required=True, help="run dir of experiment=states (unconditional)")
    parser.add_argument("--classifier", type=Path, required=True, help="run dir of experiment=states_classifier")
    parser.add_argument("--guided", type=Path, required=True, help="run dir of experiment=states_guided")
    parser.add_argument("--out", type=Path, required=True, help="folder for outputs/ and checkpoints/")
    args = parser.parse_args(argv)
    try:
        scores = export(args.states, args.classifier, args.guided, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in scores.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
