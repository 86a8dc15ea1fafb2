"""Benchmark: retrain (run through ``python benchmarks/run.py retrain``)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT


# --------------------------------------------------------------------------------------------- retrain
ZOO = ROOT / "hpedge" / "zoo" / "models"  # the committed models and their train_record.json
# each family's pre-trained text encoders: (record key of their stage, the folder it writes); a pipeline stage names
# them (or one of them: the sd3 recipe takes text-sd3/text_encoder_3) with --t5-from or --text-from
PRETRAINED_TEXT = {"flux": ("flux-t5", "t5-flux"), "sd3": ("sd3-text", "text-sd3")}


def retrain(args: argparse.Namespace) -> None:
    """Replay the recorded training commands of a zoo model (train_record.json) into a work folder, starting
    from the committed VAE and pre-trained text encoders; score the result against the committed model with
    `run.py ratio`."""
    import shlex

    zoo = ZOO
    record = json.loads((zoo / "train_record.json").read_text())
    fam = args.family
    stage, folder = PRETRAINED_TEXT[fam]
    # A pre-trained, frozen text encoder is, like the VAE, an input taken from the committed files unless
    # --retrain-text: its stage is bit-reproducible on one kind of CPU only (benchmarks/results/experiment-t5-float64.md)
    if stage not in record:
        raise SystemExit(f"{zoo / 'train_record.json'}: no {stage} stage, so digits-{fam}'s pre-trained text encoders "
                         "cannot be replayed or copied")
    text = "retrained" if args.retrain_text else "committed"
    pretrain = [record[stage]["command"]] if text == "retrained" else []
    commands = [*pretrain, record[fam]["command"], *(r["command"] for r in record.get(f"{fam}-continued", []))]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    progress = work / f"retrain-{fam}.json"  # stages already replayed into this folder (a replay can be resumed)
    done = json.loads(progress.read_text()) if progress.exists() else {"stages": [], "text": text}
    was = done.get("text", done.get("t5"))  # "t5": the key of progress files written before sd3-text existed
    if was != text and done["stages"]:
        raise SystemExit(f"{work}: a replay with the {was} text encoders is under way there; resume it the same way "
                         f"({'with' if was == 'retrained' else 'without'} --retrain-text) or use another --work")
    if [x["recorded"] for x in done["stages"]] != commands[:len(done["stages"])]:
        raise SystemExit(f"{work}: the stages replayed there are not the recorded ones now in train_record.json (the "
                         "committed model changed); use another --work")
    if not (work / "vae").exists():
        shutil.copytree(zoo / "vae", work / "vae")
    if text == "committed" and not (work / folder).exists():
        shutil.copytree(zoo / folder, work / folder)
    log = done["stages"]
    t_start = time.time()
    for cmd in commands[len(log):]:
        if args.max_seconds and time.time() - t_start > args.max_seconds:
            print(f"stopping after {len(log)} of {len(commands)} stages (--max-seconds); run again to resume", flush=True)
            return
        argv = shlex.split(cmd)[3:]  # drop "python -m hpedge.zoo.train"
        if "--device" in argv:  # the recorded device (cuda for the GPU stages) gives way to this replay's --device
            i = argv.index("--device")
            del argv[i:i + 2]
        if "--init-from" in argv:
            argv[argv.index("--init-from") + 1] = str(work / f"digits-{fam}")
        for flag in ("--t5-from", "--text-from"):  # the recorded pre-trained encoders -> their copy (or replay) in work
            if flag in argv:
                parts = Path(argv[argv.index(flag) + 1]).parts
                if folder not in parts:
                    raise SystemExit(f"{cmd}: {flag} names no {folder} folder, the {stage} stage's output")
                argv[argv.index(flag) + 1] = str(work.joinpath(*parts[parts.index(folder):]))
        argv += ["--out", str(work), "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        t = time.time()
        print("$ python -m hpedge.zoo.train " + " ".join(argv), flush=True)
        subprocess.run([sys.executable, "-m", "hpedge.zoo.train", *argv], check=True, cwd=ROOT)
        log.append({"recorded": cmd, "replayed": " ".join(argv), "seconds": round(time.time() - t, 1), "device": args.device})
        progress.write_text(json.dumps({"stages": log, "text": text}, indent=2) + "\n")
    print(f"retrained digits-{fam} in {sum(x['seconds'] for x in log):.0f} s -> {work / f'digits-{fam}'}; score it with: "
          f"python benchmarks/run.py ratio zoo:digits-{fam} {work / f'digits-{fam}'} --name retrain-digits-{fam} --tolerance")
