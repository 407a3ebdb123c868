"""`pocketr1 run`: the whole R1-Zero pipeline in one folder, resumable after a kill at any point.

    corpus → tokenizer → pretrain (base) → eval base → GRPO (rl) → eval rl → report

Each finished stage is recorded in `state.json` (written atomically) with its wall and CPU time; stages
that train keep their own checkpoints, so `--resume` redoes at most the steps since the last one.

Under torchrun every rank runs the training stages (`DISTRIBUTED_STAGES`) together; the others run on rank 0
alone while the rest wait, then re-read what it wrote. Only rank 0 writes into the folder.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pocketr1 import config as config_mod
from pocketr1.config import RunConfig
from pocketr1.errors import UserError
from pocketr1.evaluate import evaluate_family
from pocketr1.fsutil import check_writable, read_json, write_json, write_text
from pocketr1.model import Transformer, load_model, save_model
from pocketr1.report import write_report
from pocketr1.tasks import get_family
from pocketr1.tasks.corpus import build_corpus, describe
from pocketr1.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer
from pocketr1.train import distributed
from pocketr1.train.common import Metrics, pick_device, set_threads
from pocketr1.train.grpo import grpo
from pocketr1.train.pretrain import pretrain

STAGES = ("corpus", "tokenizer", "pretrain", "eval_base", "grpo", "eval_rl", "report")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DISTRIBUTED_STAGES = ("pretrain", "grpo")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


class Run:
    """A run folder: its config, its progress, and the stages that fill it."""

    def __init__(self, folder: Path, cfg: RunConfig):
        self.folder, self.cfg = folder, cfg
        self.fsdp = False  # shard the model over the ranks (torchrun --fsdp) instead of replicating it
        self.metrics = Metrics(folder / "metrics.jsonl")
        self.device = distributed.local_device(pick_device(cfg.device))
        set_threads(cfg.threads)
        state_path = folder / "state.json"
        self.state = read_json(state_path) if state_path.exists() else {"done": [], "cost": {}}

    @classmethod
    def create(cls, folder: Path, cfg: RunConfig) -> Run:
        if distributed.is_main():  # one prober: ranks sharing a folder would race on the probe file
            check_writable(folder)
        if (folder / "state.json").exists():
            raise UserError(f"{folder} already holds a run; use --resume to continue it or choose another --out.")
        if distributed.is_main():
            write_json(folder / "config.json", config_mod.to_dict(cfg))
        distributed.barrier()  # no rank looks for state.json after rank 0 could have written it
        return cls(folder, cfg)

    @classmethod
    def open(cls, folder: Path) -> Run:
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not a run folder (no config.json).")
        return cls(folder, config_mod.from_dict(read_json(folder / "config.json")))

    # --- bookkeeping -------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def _record(self, stage: str, wall: float, cpu: float, **extra) -> None:
        cost = self.state["cost"].setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
        cost["wall_s"] = round(cost["wall_s"] + wall, 2)
        cost["cpu_s"] = round(cost["cpu_s"] + cpu, 2)
        if extra:
            self.state.setdefault("info", {}).update(extra)
        if stage not in self.state["done"]:
            self.state["done"].append(stage)
        write_json(self.folder / "state.json", self.state)

    def tokenizer(self) -> ChatTokenizer:
        return ChatTokenizer(self.folder / "tokenizer")

    def model(self, name: str) -> Transformer:
        return load_model(self.folder / name, device=self.device)

    def save(self, model: Transformer, name: str) -> None:
        if not distributed.is_main():
            return
        save_model(model, self.folder / name,
                   {f: self.folder / "tokenizer" / f for f in TOKENIZER_FILES})

    # --- stages ------------------------------------------------------------------------------------
    def corpus(self):
        d = self.cfg.data
        return build_corpus(d.families, d.train_docs, d.worked_fraction, d.difficulty, d.seed,
                            refusal_docs=d.refusal_docs, topic_docs=d.topic_docs)

    def stage_corpus(self) -> dict:
        docs = self.corpus()
        lines = (json.dumps({"family": x.problem.family, "question": x.problem.question,
                             "completion": x.completion, "worked": x.worked}) for x in docs)
        write_text(self.folder / "corpus.jsonl", "\n".join(lines) + "\n")
        return {"corpus": describe(docs)}

    def stage_tokenizer(self) -> dict:
        docs = self.corpus()
        texts = [x.problem.question for x in docs] + [x.completion for x in docs]
        tok = train_tokenizer(texts, self.cfg.tokenizer.vocab_size)
        save_tokenizer(tok, self.folder / "tokenizer", self.cfg.model.max_position_embeddings)
        chat = self.tokenizer()
        m = self.cfg.model
        m.vocab_size = chat.vocab_size
        m.bos_token_id, m.eos_token_id = chat.token_id(chat.bos_token), chat.eos_id
        write_json(self.folder / "config.json", config_mod.to_dict(self.cfg))  # vocab size is now known
        return {"vocab_size": chat.vocab_size}

    def stage_pretrain(self) -> dict:
        model = pretrain(self.cfg, self.folder, self.tokenizer(), self.corpus(), self.device, self.metrics,
                         fsdp=self.fsdp)
        self.save(model, "base")
        return {"parameters": sum(p.numel() for p in model.parameters())}

    def stage_grpo(self) -> dict:
        model = grpo(self.cfg, self.folder, self.tokenizer(), self.model("base"), self.device, self.metrics,
                     fsdp=self.fsdp)
        self.save(model, "rl")
        return {}

    def eval_plan(self) -> list[tuple[str, dict, str]]:
        """(family, difficulty, split label) for every eval row: each task in range, then the stretch rows."""
        d = self.cfg.data
        plan = [(f, get_family(f).difficulty(d.difficulty.get(f)), "held-out") for f in d.families]
        for f, overrides in self.cfg.stretch.items():
            if f in d.families:
                level = get_family(f).difficulty({**d.difficulty.get(f, {}), **overrides})
                plan.append((f, level, "held-out, beyond training range"))
        return plan

    def evaluate(self, name: str) -> dict:
        model, tok, ec = self.model(name), self.tokenizer(), self.cfg.eval
        rows = []
        for family, level, split in tqdm(self.eval_plan(), desc=f"eval {name}", unit="task", dynamic_ncols=True):
            rows.append(evaluate_family(model, tok, get_family(family), level, ec.problems, ec.k, ec)
                        | {"split": split})
        write_json(self.folder / "eval" / f"{name}.json", {"model": name, "rows": rows})
        return {}

    def stage_eval_base(self) -> dict:
        return self.evaluate("base")

    def stage_eval_rl(self) -> dict:
        return self.evaluate("rl")

    def stage_report(self) -> dict:
        write_report(self)
        return {}

    def stages(self) -> tuple[str, ...]:
        """This run's stages: the R1-Zero pipeline above, or its recipe's (recipe.py)."""
        from pocketr1 import recipe

        return recipe.stages_of(self.cfg.recipe, STAGES)

    def stage_function(self, stage: str):
        from pocketr1 import recipe

        own = getattr(self, f"stage_{stage}", None)
        return own if own is not None else (lambda: recipe.STAGE_FUNCTIONS[stage](self))

    def run(self, until: str | None = None, redo: bool = False) -> None:
        """Every stage up to `until` (default: all) that is not done yet; `redo` runs `until` again even if
        it is."""
        from pocketr1 import recipe

        recipe.check_recipe(self)
        stages = self.stages()
        until = until or stages[-1]
        if until not in stages:
            raise UserError(f"stage '{until}' is not part of the {self.cfg.recipe} recipe ({', '.join(stages)}).")
        if redo and until in self.state["done"]:
            self.state["done"].remove(until)
        todo = [s for s in stages[:stages.index(until) + 1] if not self.done(s)]
        for stage in todo:
            main = distributed.is_main()
            if main:
                print(f"pocketr1: [{stages.index(stage) + 1}/{len(stages)}] {stage} -> {self.folder}",
                      file=sys.stderr, flush=True)
            if stage in DISTRIBUTED_STAGES or main:
                t0, c0 = time.perf_counter(), cpu_seconds()  # rank 0's own time only, under torchrun
                extra = self.stage_function(stage)()
                if main:
                    self._record(stage, time.perf_counter() - t0, cpu_seconds() - c0, **extra)
            if distributed.world() > 1:
                distributed.barrier(slow=True)
                if not main:  # what rank 0 wrote: progress, and the vocab size after the tokenizer
                    self.state = read_json(self.folder / "state.json")
                    self.cfg = config_mod.from_dict(read_json(self.folder / "config.json"))


def latest_link(runs_root: Path, folder: Path) -> None:
    """Point `runs/latest` at `folder` (replaced atomically)."""
    link = runs_root / "latest"
    tmp = runs_root / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(folder, runs_root), tmp)
    os.replace(tmp, link)
