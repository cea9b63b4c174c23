"""Hard-negative probe (issue #3): does a second pre-training phase with one-word hard ITM
negatives teach the word-attribute binding that NLVR needs?

Starts from the ``pretrain`` stage's export of ``--preset`` (backbone only: the ITM / MLM
heads start fresh), trains ``--steps`` more steps of the preset's objectives on the same
corpus with a share ``--hard-frac`` of the ITM negatives hard (one slot of the caption
changed; ``--hard-frac 0`` is the control: the same extra steps with random negatives), and
prints the validation metrics (half hard negatives, as the stage scores them) before and after
as one JSON line. ``--out DIR`` exports the backbone (``DIR/final``) for
``scripts/probes/nlvr_calibration.py --weights DIR/final``. Val only: nothing reads test.

Session 5's calls (vilt-mini, 2 x 1 thread side by side)::

    python scripts/probes/hard_negative_phase.py --hard-frac 0.5 --steps 200 --out /tmp/hn50
    python scripts/probes/hard_negative_phase.py --hard-frac 0.0 --steps 200 --out /tmp/hn00
    # val hard-negative ITM 0.391 -> 0.453 (hard phase) / 0.500 (control: says "match" to most)
    KM='{"n_objects":[1,2],"grid":2,"distractors":0,"shapes":["circle","square","triangle"],
         "colours":["red","green","blue"],"minimal_pairs":true,"image_size":128,"n_train":3000,
         "n_val":500,"n_test":500,"statement_types":["exist","pair"]}'
    python scripts/probes/nlvr_calibration.py --threads 1 --knobs "$KM" --n-train 2000 --epochs 3 \
        --lr 1e-4 --warmup-steps 19 --schedule linear --weights /tmp/hn50/final     # 61.0
    ... --weights /tmp/hn00/final                                                  # 54.3
    ... (the pretrain stage's weights)                                             # 53.3
    ... --no-weights                                                               # 50.0
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch


def main(argv=None) -> dict:
    from vlkit import config
    from vlkit.models import build
    from vlkit.pretrain import (PretrainModel, build_corpus, build_val_corpus, collator_for, evaluate, export_final,
                                fixed_batches, param_groups, pretrain_loss)
    from vlkit.train import TrainConfig, fit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vilt-mini")
    ap.add_argument("--hard-frac", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="export the backbone to OUT/final")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = config.resolve("pretrain", "default")
    cfg = dataclasses.replace(cfg, hard_frac=a.hard_frac)
    corpus = build_corpus(cfg, "default", "train", 0)
    val = build_val_corpus(cfg, "default", 0)
    backbone = build(a.preset, weights=f"runs/pretrain/{a.preset}/final")
    objectives = list(cfg.objectives[a.preset])
    model = PretrainModel(backbone, objectives, cfg.itc_temperature, seed=0)
    vocab = backbone.text_embeddings.word_embeddings.num_embeddings
    collate = collator_for(corpus, cfg, vocab, objectives=objectives)
    val_batches = fixed_batches(val, collator_for(val, cfg, vocab, objectives=objectives, val=True), cfg.eval_rows,
                                cfg.batch_size, 0)
    before = evaluate(model, val_batches)
    tc = TrainConfig(steps=a.steps, batch_size=cfg.batch_size, lr=a.lr, weight_decay=cfg.weight_decay,
                     max_grad_norm=cfg.max_grad_norm, schedule="linear", warmup_steps=int(0.1 * a.steps), seed=0,
                     progress=False, log_every=max(1, a.steps // 10))
    result = fit(model, pretrain_loss, corpus, config=tc, collate_fn=collate,
                 param_groups=param_groups(model, set(), a.lr, cfg.lr_new_mult, cfg.weight_decay))
    after = evaluate(model, val_batches)
    tail = result.history[-max(1, len(result.history) // 10):]
    train_tail = {k: float(sum(h[k] for h in tail if k in h) / max(1, sum(k in h for h in tail)))
                  for k in ("itm_acc", "itm_hard_acc", "mlm_grounded_acc")}
    if a.out:
        export_final(model.backbone.eval(), a.out, result.step, {"probe": vars(a)})
    keys = ("val_itm_acc", "val_itm_hard_acc", "val_mlm_grounded_acc", "val_shuffled_itm_acc")
    res = {"preset": a.preset, "hard_frac": a.hard_frac, "steps": a.steps, "lr": a.lr,
           "before": {k: round(float(before[k]), 3) for k in keys if k in before},
           "after": {k: round(float(after[k]), 3) for k in keys if k in after},
           "train_tail": {k: round(v, 3) for k, v in train_tail.items()}}
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
