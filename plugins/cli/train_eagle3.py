"""``afterburner train eagle3``: an EAGLE-3 drafter in vLLM's format (``"method": "eagle3"`` loads it), by
the micro-step drafter's recipe: same data, feature layers, schedule and checkpoints
(spec_decode/eagle3/). It is the fixed-length baseline of ``train hamburger``'s drafter.

    afterburner train eagle3 --base DIR --data FILE [FILE ...] --out DIR [--feature-layers 8,16,24,28]
        [--micro-steps 4] [--epochs E | --steps N] [--batch-size CHUNKS] [--residual-init]
        [--work-dir DIR] [--resume] [...]

--micro-steps is the number of draft steps unrolled in training (EAGLE-3's training-time test). A
--work-dir shared with ``train hamburger`` on the same data and layers reuses its cached base pass.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(methods: argparse._SubParsersAction) -> None:
    from afterburner.plugins.cli.train_hamburger import add_drafter_arguments

    p = methods.add_parser("eagle3", help="an EAGLE-3 drafter vLLM's eagle3 method loads (the micro-step "
                                          "drafter's fixed-length baseline)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_drafter_arguments(p, batch_help="chunks per step (default 4)", batch_default=4)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from afterburner.plugins.cli.training import run_training
    from afterburner.spec_decode.eagle3.folder import Eagle3FolderError

    if args.layers != 1:
        print("error: an EAGLE-3 drafter has one decoder layer (--layers 1)", file=sys.stderr)
        return 2
    return run_training(_train, args, Eagle3FolderError)


def _train(args: argparse.Namespace) -> int:
    import torch

    from afterburner.plugins import __version__
    from afterburner.plugins.cli.train_hamburger import prepare
    from afterburner.plugins.cli.training import summary_head
    from afterburner.spec_decode.eagle3.folder import save_eagle3
    from afterburner.spec_decode.eagle3.train import residual_init, train_eagle3
    from afterburner.spec_decode.hamburger.train import TrainConfig, base_norm_init
    from afterburner.spec_decode.medusa import distill_data

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         seed=args.seed, holdout=args.holdout, save_every=args.save_every)
    work = args.work_dir or args.out.with_name(args.out.name + ".train")
    model, drafter_config, base, embed, lm_head = prepare(args, work)
    layers = drafter_config.feature_layers
    softcap, max_positions = distill_data.logit_softcap(model), model.config.max_position_embeddings
    init = base_norm_init(model, drafter_config)
    init = residual_init(drafter_config, init, seed=args.seed) if args.residual_init else \
        {f"fc_norm.{k}.weight": init[f"feature_norms.{k}.weight"] for k in range(len(layers))}
    del model
    result = train_eagle3(base, embed, lm_head, drafter_config=drafter_config, config=config, work_dir=work,
                          resume=args.resume, softcap=softcap, init=init)
    provenance = {
        "method": "self-distillation (EAGLE-3 training-time test)", "afterburner": __version__,
        "data": [str(p) for p in args.data], "data_key": base.key, "tokens": len(base.tokens),
        "steps": result.step, "seq_len": args.seq_len, "config": config.__dict__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "train_seconds": round(result.seconds, 1),
        "init": "residual" if args.residual_init else "base norms", "argv": sys.argv[1:],
        "holdout": result.after, "holdout_untrained": result.before,
    }
    save_eagle3(args.out, result.drafter, max_position_embeddings=max_positions, provenance=provenance)
    after, before = result.after, result.before
    lines = summary_head(f"[afterburner] EAGLE-3 drafter -> {args.out} (feature layers "
                         f"{','.join(map(str, layers))})", result, len(base.tokens), time.time() - started,
                         "loss (KL)")
    if after:
        top1 = " ".join(f"{a:.3f}" for a in after["top1"])
        lines += [f"  held-out top-1 agreement with the base, draft steps 1..{args.micro_steps}: {top1}",
                  f"  mean run of agreeing steps (accepted-length proxy, teacher-forced): {after['accepted']:.2f} "
                  f"(untrained: {before.get('accepted', float('nan')):.2f})"]
    print("\n".join(lines), flush=True)
    return 0
