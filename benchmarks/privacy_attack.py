"""What an honest-but-curious server learns from FedDTL's uploads: re-identification and membership rates.

    python benchmarks/privacy_attack.py RUN_DIR [RUN_DIR ...] [--others 2000] [--json OUT.json]

For each finished FedDTL run (its config.toml and final_lora.safetensors), the uploads are regenerated:
every client trains one more local round from the run's final global model (the real client step, seed of
round T + 1) and uploads what its config says (embeddings of its capped subsample, or per-class
prototypes, with the run's [privacy] noise when it has one; the noise multiplier is the run's own). The
server plays the attacker with the global image LoRA as its encoder (it never sees the clients' local LoRA
applied to candidates) and public images of the same data set:

(a) re-identification, embeddings: for each uploaded embedding, rank a pool of candidate images (the
    client's own training images mixed with --others images of the data set's training split that no
    client holds) by cosine similarity; top-1 / top-5 rate of the exact source image. Chance: 1 / pool and
    5 / pool; "chance | label": the same among the pool's images of the uploaded label.
(b) re-identification, prototypes: for each uploaded class prototype, is one of the client's images of that
    class among the top-1 / top-5 candidates? Chance: hypergeometric, over the pool and over its images
    of that class.
(c) membership: tell a client's training images from held-out test images of the same classes (as many),
    by the best similarity to the client's uploads of the candidate's label; ROC AUC (chance 0.5) and the
    best threshold's balanced accuracy, averaged over clients. The threshold is picked on the same small
    sample, so that accuracy's chance level is above 50 %: it is measured with shuffled member labels. The
    model-only columns score by the global model's log-probability of the true class: what the final model
    alone gives away, uploads aside.

The regenerated uploads are one round after the run's last: with [privacy], the accountant's budget covers
the run's own T rounds, and this extra round is the attacker's sample of a single round's noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from feddtl.algorithm.client import capped_upload_index
from feddtl.algorithm.encoding import image_embeddings
from feddtl.algorithm.grpo import class_logits
from feddtl.algorithm.messages import ClientTask
from feddtl.algorithm.privacy import private_embeddings, private_prototypes, upload_noise
from feddtl.algorithm.prototypes import class_prototypes
from feddtl.algorithm.server import class_embeddings
from feddtl.config import ExperimentConfig, load_config
from feddtl.data import load_dataset
from feddtl.federation import Federation, build_federation, class_split, client_indices, trunk_features
from feddtl.methods.state import unprefixed
from feddtl.server.clients import client_seed
from feddtl.server.experiment import build_method


# --- the attacks on vectors (pure functions) ----------------------------------------------------------

def reid_ranks(uploads: torch.Tensor, pool: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each upload (n, D), the 0-based rank of its true source ``targets[j]`` (a pool row) among the
    pool (N, D) by cosine similarity (ties counted against the attacker)."""
    sims = uploads @ pool.T
    true = sims.gather(1, targets.view(-1, 1))
    return (sims > true).sum(1) + (sims == true).sum(1) - 1


def hit_at_k(uploads: torch.Tensor, pool: torch.Tensor, positives: list[torch.Tensor], k: int) -> torch.Tensor:
    """For each upload, whether one of its ``positives`` (pool rows) is among its k most similar candidates."""
    top = (uploads @ pool.T).topk(min(k, len(pool)), dim=1).indices
    return torch.tensor([bool(np.isin(top[j].numpy(), pos.numpy()).any()) for j, pos in enumerate(positives)])


def chance_hit_at_k(pool_size: int, positives: int, k: int) -> float:
    """P(at least one of ``positives`` among k candidates drawn at random from ``pool_size``)."""
    k = min(k, pool_size)
    if positives <= 0:
        return 0.0
    return 1.0 - math.comb(pool_size - positives, k) / math.comb(pool_size, k)


def roc_auc(members: torch.Tensor, others: torch.Tensor) -> float:
    """P(score of a random member > score of a random non-member), ties half (Mann-Whitney)."""
    diff = members.view(-1, 1) - others.view(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def best_accuracy(members: torch.Tensor, others: torch.Tensor) -> float:
    """Balanced accuracy of the best threshold "score >= t means member" (members and others equally many)."""
    scores = torch.cat([members, others])
    best = 0.5
    for t in scores.unique():
        tpr = (members >= t).float().mean()
        tnr = (others < t).float().mean()
        best = max(best, float((tpr + tnr) / 2))
    return best


def permuted_best_accuracy(scores: torch.Tensor, members: int, rng: np.random.Generator, draws: int = 20) -> float:
    """The best-threshold accuracy of ``scores`` with the member labels shuffled, averaged: its chance level
    (above 0.5 for small samples, since the threshold is picked on the same sample)."""
    accs = []
    for _ in range(draws):
        perm = torch.as_tensor(rng.permutation(len(scores)), dtype=torch.long)
        accs.append(best_accuracy(scores[perm[:members]], scores[perm[members:]]))
    return float(np.mean(accs))


def membership_scores(candidates: torch.Tensor, labels: torch.Tensor, uploads: torch.Tensor, upload_labels: torch.Tensor) -> torch.Tensor:
    """Best cosine similarity of each candidate to the uploads of its label (to all uploads if none)."""
    sims = candidates @ uploads.T
    same = labels.view(-1, 1) == upload_labels.view(1, -1)
    masked = torch.where(same, sims, torch.full_like(sims, -2.0))
    return torch.where(same.any(1), masked.max(1).values, sims.max(1).values)


# --- regenerating a run's uploads ----------------------------------------------------------------------

@dataclass
class Upload:
    """One client's regenerated upload, with the ground truth the server never sees."""

    vectors: torch.Tensor
    labels: torch.Tensor
    """Base-class indices."""
    source: torch.Tensor | None
    """Embeddings: the local index of each vector's image; prototypes: None."""


def load_global(fed: Federation, run_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Load the run's final global model into the backbone; (global image LoRA, base-class text embeddings)."""
    weights = load_file(str(run_dir / "final_lora.safetensors"))
    image_lora = unprefixed(weights, "image", list(fed.backbone.image_lora_state()))
    fed.backbone.load_image_lora(image_lora)
    fed.backbone.load_text_lora(unprefixed(weights, "text"))
    return image_lora, class_embeddings(fed.backbone, fed.base_text)


def regenerate_uploads(fed: Federation, image_lora: dict[str, torch.Tensor], base_T: torch.Tensor, local_round: bool) -> list[Upload]:
    """Each client's upload of round T + 1, computed as the client step computes it (its subsample draw aside)."""
    config = fed.config
    method = build_method(fed)
    noise = upload_noise(config.privacy, config.rounds)
    stage = method.stage(config.rounds)
    uploads = []
    for k, data in enumerate(fed.clients):
        seed = client_seed(config.seed, config.rounds + 1, k)
        fed.backbone.load_image_lora(image_lora)
        if local_round:
            task = ClientTask(round=config.rounds + 1, stage=stage, image_lora=image_lora, class_embeddings=base_T)  # type: ignore[arg-type]
            fed.backbone.load_image_lora(method.client_step(fed.backbone, data, task, config, seed).image_lora)
        generator = torch.Generator().manual_seed(seed)
        if config.client.upload == "prototypes":
            local = image_embeddings(fed.backbone, data.features, config.client.batch_size)
            vectors, labels = (class_prototypes(local, data.labels) if noise is None
                               else private_prototypes(local, data.labels, noise, noise.generator(seed)))
            uploads.append(Upload(vectors, labels, None))
        else:
            index = capped_upload_index(data.labels, config.client.upload_cap_per_class, generator)
            vectors = image_embeddings(fed.backbone, data.features, config.client.batch_size, index)
            if noise is not None:
                vectors = private_embeddings(vectors, noise, noise.generator(seed))
            uploads.append(Upload(vectors, data.labels[index].clone(), index))
    fed.backbone.load_image_lora(image_lora)
    return uploads


# --- the whole attack on one run -----------------------------------------------------------------------

def attack_run(run_dir: Path, others: int = 2000, seed: int = 0, local_round: bool = True, log_fn=print) -> dict[str, Any]:
    """Every rate of one run (see the module docstring), with its chance levels."""
    config: ExperimentConfig = load_config(str(run_dir / "config.toml"))
    if config.method not in ("feddtl", "feddtl-decoupled"):
        raise SystemExit(f"{run_dir}: method {config.method!r} uploads no embeddings or prototypes")
    with tempfile.TemporaryDirectory(prefix="privacy-attack-") as tmp:
        fed = build_federation(config, log_fn=lambda s: None, run_dir=tmp)
        try:
            image_lora, base_T = load_global(fed, run_dir)
            uploads = regenerate_uploads(fed, image_lora, base_T, local_round)
            # the attacker's public images: training-split images no client holds, all classes
            splits = load_dataset(config.dataset, config.data, seed=config.seed)
            classes = class_split(config, splits)
            held = np.concatenate(client_indices(config, splits, classes))
            free = np.setdiff1d(np.arange(len(splits.train.labels)), held)
            rng = np.random.default_rng(seed)
            extra = np.sort(rng.choice(free, size=min(others, len(free)), replace=False))
            extra_emb = image_embeddings(fed.backbone, trunk_features(fed.backbone, splits.train, extra, config), 256)
            extra_labels = torch.as_tensor(splits.train.labels[extra], dtype=torch.long)
            base_of = torch.tensor(classes.base)
            test_emb = image_embeddings(fed.backbone, fed.eval_set.base_features, 256)
            test_labels = fed.eval_set.base_labels
            return _rates(fed, uploads, base_T, base_of, extra_emb, extra_labels, test_emb, test_labels, rng)
        finally:
            if fed.cache is not None:
                fed.cache.close()


def _rates(fed, uploads, base_T, base_of, extra_emb, extra_labels, test_emb, test_labels, rng) -> dict[str, Any]:
    prototypes = fed.config.client.upload == "prototypes"
    top1, top5, chance1, chance5, label1, label5, aucs, accs, chance_accs, model_aucs, model_accs = ([] for _ in range(11))
    for k, (data, up) in enumerate(zip(fed.clients, uploads)):
        own = image_embeddings(fed.backbone, data.features, 256)  # under the global LoRA: the attacker's view
        pool = torch.cat([own, extra_emb])
        pool_labels = torch.cat([base_of[data.labels], extra_labels])  # original labels
        n = len(pool)
        if prototypes:
            positives = [torch.nonzero(data.labels == c).flatten() for c in up.labels]
            top1 += hit_at_k(up.vectors, pool, positives, 1).tolist()
            top5 += hit_at_k(up.vectors, pool, positives, 5).tolist()
            for c, pos in zip(up.labels, positives):
                same = int((pool_labels == base_of[c]).sum())
                chance1.append(chance_hit_at_k(n, len(pos), 1))
                chance5.append(chance_hit_at_k(n, len(pos), 5))
                label1.append(chance_hit_at_k(same, len(pos), 1))
                label5.append(chance_hit_at_k(same, len(pos), 5))
        else:
            ranks = reid_ranks(up.vectors, pool, up.source)
            top1 += (ranks < 1).tolist()
            top5 += (ranks < 5).tolist()
            same = (pool_labels.view(1, -1) == base_of[up.labels].view(-1, 1)).sum(1)
            chance1 += [1 / n] * len(ranks)
            chance5 += [min(5, n) / n] * len(ranks)
            label1 += (1 / same).tolist()
            label5 += (torch.clamp(same, max=5) / same).tolist()
        # membership: the client's training images against as many held-out test images of its classes
        held = torch.nonzero(torch.isin(test_labels, data.labels)).flatten()
        held = held[torch.as_tensor(rng.permutation(len(held))[: len(data)], dtype=torch.long)]
        candidates, cand_labels = torch.cat([own, test_emb[held]]), torch.cat([data.labels, test_labels[held]])
        member = torch.arange(len(candidates)) < len(data)
        score = membership_scores(candidates, cand_labels, up.vectors, up.labels)
        aucs.append(roc_auc(score[member], score[~member]))
        accs.append(best_accuracy(score[member], score[~member]))
        chance_accs.append(permuted_best_accuracy(score, len(data), rng))
        logp = torch.log_softmax(class_logits(candidates, base_T, fed.backbone.logit_scale), dim=-1)
        model = logp.gather(1, cand_labels.view(-1, 1)).flatten()
        model_aucs.append(roc_auc(model[member], model[~member]))
        model_accs.append(best_accuracy(model[member], model[~member]))
    mean = lambda xs: float(np.mean([float(x) for x in xs]))  # noqa: E731
    return {
        "upload": fed.config.client.upload,
        "upload_epsilon": fed.config.privacy.upload_epsilon,
        "uploads": len(top1),
        "pool_mean": float(np.mean([len(d) for d in fed.clients])) + len(extra_emb),
        "reid_top1": mean(top1), "reid_top5": mean(top5),
        "chance_top1": mean(chance1), "chance_top5": mean(chance5),
        "chance_label_top1": mean(label1), "chance_label_top5": mean(label5),
        "membership_auc": mean(aucs), "membership_acc": mean(accs), "chance_membership_acc": mean(chance_accs),
        "model_membership_auc": mean(model_aucs), "model_membership_acc": mean(model_accs),
    }


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The rates as a markdown table, in percent, chance beside each."""
    lines = [
        "| run | upload | ε (uploads) | re-id top-1 | chance (label) | re-id top-5 | chance (label) | "
        "membership AUC / acc (chance acc) | model-only AUC / acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    for name, r in rows:
        eps = "∞" if r["upload_epsilon"] is None else f"{r['upload_epsilon']:g}"
        lines.append(
            f"| {name} | {r['upload']} | {eps} | {pct(r['reid_top1'])} | {pct(r['chance_top1'])} ({pct(r['chance_label_top1'])}) | "
            f"{pct(r['reid_top5'])} | {pct(r['chance_top5'])} ({pct(r['chance_label_top5'])}) | "
            f"{r['membership_auc']:.3f} / {pct(r['membership_acc'])} ({pct(r['chance_membership_acc'])}) | {r['model_membership_auc']:.3f} / {pct(r['model_membership_acc'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished feddtl run directories")
    parser.add_argument("--others", type=int, default=2000, help="unheld training images mixed into each pool")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacker's pool and held-out samples")
    parser.add_argument("--no-local-round", action="store_true",
                        help="upload under the final global LoRA instead of after one more local round")
    parser.add_argument("--json", type=Path, default=None, help="also write the rates here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the lite backbone's "Loading weights" bar, once per run
    rows = []
    for run in args.runs:
        if not (run / "final_lora.safetensors").is_file():
            print(f"{run}: no final_lora.safetensors (not a finished run); skipped", file=sys.stderr)
            continue
        rows.append((str(run), attack_run(run, args.others, args.seed, not args.no_local_round)))
    if not rows:
        return 2
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(dict(rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
