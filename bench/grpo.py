"""GRPO step throughput: pocket-r1's GRPO against TRL's `GRPOTrainer`, same model, prompts and rewards.

Both sides load one Hugging Face folder: by default a random tiny Qwen2 (hidden 256, 4 layers, vocab 512)
saved by transformers with a pocket-r1 tokenizer, or `--base DIR`, a pocket-r1 base model (e.g.
`runs/latest/base`), for a reward comparison that means something. Each step takes the same
`--prompts` arithmetic problems (train split, drawn once for all steps) × `--group` samples of at most
`--max-tokens` tokens at temperature 1, the same reward (R1's rule accuracy + 0.1 × format, pocket-r1's
functions wrapped as one TRL reward function), β, ε, learning rate (constant), AdamW (β2 0.95, no weight
decay), gradient clipping 1.0, one optimiser step per rollout, the per-sequence-mean "grpo" loss with
group-std-scaled advantages. Each side runs at its default precision: TRL's `bf16=True` (its default),
pocket-r1's `dtype=auto` (bf16 autocast where the CPU has native bf16, else fp32).

Each side lives in its own worker process (spawned by this one), so peak RSS is per side. The parent
asks them for steps in alternating rounds and times each step from request to reply (each worker also
reports the CPU time its process spent on the step: on a shared, overloaded machine wall times swing with
the neighbours, CPU times much less); after the last step both final policies are scored by the same
held-out evaluator (pocket-r1's, one sample per problem at T=0.6, top-p 0.95). TRL runs with
`use_cpu=True`, no vLLM, `report_to="none"`, offline.

    python bench/grpo.py                      # random tiny Qwen2: 1 warm-up + 10 rounds x 2 steps each
    python bench/grpo.py --base runs/x/base   # a pretrained pocket-r1 base: reward means something
    python bench/grpo.py --quick              # smoke run -> results/grpo-quick.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline / OpenMP environment before torch)
import torch  # noqa: E402

SIDES = ("trl", "pocketr1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="a model folder with a pocket-r1 tokenizer (default: a random "
                                             "tiny Qwen2 built here)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default: 16)")
    p.add_argument("--group", type=int, default=8, help="G, completions per prompt (default: 8)")
    p.add_argument("--max-tokens", type=int, default=96, help="max completion length (default: 96)")
    p.add_argument("--beta", type=float, default=0.001, help="KL weight; >0 loads a reference model (default: "
                                                             "0.001)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: 5e-5)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    p.add_argument("--steps-per-round", type=int, default=2, help="steps per side per round (default: 2)")
    p.add_argument("--eval-problems", type=int, default=400, help="held-out problems scored at the end "
                                                                 "(default: 64; 0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both workers (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="torch.profiler on each side's last step: print the "
                                                            "top ops (one extra step, left out of the timings)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 prompts x 4, 32 tokens, 1 round of 1 step")
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/grpo.json, grpo-base.json "
                                            "with --base, grpo-quick.json with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.group, args.max_tokens, args.rounds, args.steps_per_round = 4, 4, 32, 1, 1
        args.eval_problems = min(args.eval_problems, 8)
    name = "grpo-quick" if args.quick else "grpo-base" if args.base else "grpo"
    args.out = args.out or common.RESULTS / f"{name}.json"
    return args


def _profiler(spec: dict, step: int, n_steps: int):
    """A started torch.profiler for the last step when --profile asked for it, else None."""
    if not spec["profile"] or step != n_steps - 1:
        return None
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    prof.__enter__()
    return prof


def _profile_table(prof) -> str | None:
    if prof is None:
        return None
    prof.__exit__(None, None, None)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def _heldout(folder: Path, spec: dict, model=None) -> float | None:
    """pass@1 (one sample each, T=0.6, top-p 0.95) on held-out arithmetic, pocket-r1's evaluator for both."""
    if not spec["eval_problems"]:
        return None
    from pocketr1.config import EvalConfig
    from pocketr1.evaluate import evaluate_family
    from pocketr1.model import load_model
    from pocketr1.tasks import get_family
    from pocketr1.tokenizer import ChatTokenizer

    model = model if model is not None else load_model(folder, dtype=torch.float32)
    family = get_family("arithmetic")
    row = evaluate_family(model.eval(), ChatTokenizer(folder), family, family.difficulty(), spec["eval_problems"],
                          k=1, ec=EvalConfig(), greedy=False, seed=spec["seed"] + 1)
    return row["pass@1"]


def pocketr1_worker(conn, spec: dict) -> None:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import copy

    from pocketr1.config import build
    from pocketr1.model import load_model
    from pocketr1.tokenizer import ChatTokenizer
    from pocketr1.train.common import make_optimizer
    from pocketr1.train.grpo import rollout
    from pocketr1.train.grpo_batch import pack_groups
    from pocketr1.train.grpo_update import update

    cfg = build("default", [f"grpo.prompts_per_step={spec['prompts']}", f"grpo.group_size={spec['group']}",
                            f"grpo.max_new_tokens={spec['max_tokens']}", f"grpo.beta={spec['beta']}",
                            f"grpo.lr={spec['lr']}", "grpo.variant=grpo", "grpo.minibatches=1",
                            "grpo.temperature=1.0", "grpo.format_weight=0.1", "data.families=arithmetic",
                            f"seed={spec['seed']}"])
    folder = Path(spec["folder"])
    tok = ChatTokenizer(folder)
    policy = load_model(folder, dtype=torch.float32).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if spec["beta"] > 0 else None
    optimizer = make_optimizer(policy, spec["lr"], 0.0)
    conn.send(("ready", common.peak_rss_mb()))
    step, rollouts = 0, []
    while True:
        cmd = conn.recv()
        if cmd == "step":
            common.reset_peak_rss()
            problems = spec["steps"][step]
            prof = _profiler(spec, step, len(spec["steps"]))
            policy.eval()
            t0, cpu0 = time.perf_counter(), time.process_time()
            with torch.profiler.record_function("ROLLOUT"):
                batch = rollout(policy, tok, problems, cfg, seed=spec["seed"] * 104_729 + step)
            t_roll = time.perf_counter() - t0
            with torch.profiler.record_function("UPDATE"):
                update(policy, reference, optimizer, batch, cfg)
            conn.send({"rollout_s": t_roll, "cpu_s": time.process_time() - cpu0, "tokens": float(batch.lengths.sum()),
                       "reward": float(batch.rewards.mean()), "accuracy": float(batch.accuracy.mean()),
                       "padded_positions": int(batch.ids.numel()),
                       "profile": _profile_table(prof), "peak_rss_mb": common.peak_rss_mb()})
            step += 1
            rollouts.append(batch)
        else:  # "finish"; the packed update batches' sizes are worked out here, outside the timed steps
            packed = [int(pack_groups(b.ids, b.pad_left, b.mask, b.prompt_len, torch.arange(len(b.ids))).ids.numel())
                      for b in rollouts]
            conn.send({"heldout": _heldout(folder, spec, policy), "heldout_before": _heldout(folder, spec),
                       "packed_slots": packed})
            return


def trl_worker(conn, spec: dict) -> None:
    common.start(spec["threads"])
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from pocketr1.tasks.rewards import accuracy_reward, format_reward
    from pocketr1.tokenizer import ChatTokenizer

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    folder = Path(spec["folder"])
    ours = ChatTokenizer(folder)
    problems = {p.question: p for step in spec["steps"] for p in step}
    rows = [{"prompt": ours.render([{"role": "user", "content": p.question}]), "question": p.question}
            for step in spec["steps"] for p in step]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for row in rows[:4]:  # the prompt TRL tokenizes is the one pocket-r1 samples from, token for token
        assert hf_tok(text=row["prompt"])["input_ids"] == ours.prompt_ids(row["question"]), "prompt ids differ"
    stop = set(ours.stop_ids)
    current: dict = {}

    def reward(prompts, completions, completion_ids, question, **_):
        out, acc, tokens = [], [], 0
        for text, ids, q in zip(completions, completion_ids, question):
            finished = bool(ids) and ids[-1] in stop
            tokens += len(ids) - finished
            a = accuracy_reward(problems[q], text)
            out.append(a + 0.1 * format_reward(text, finished))
            acc.append(a)
        current.update(reward=sum(out) / len(out), accuracy=sum(acc) / len(acc), tokens=float(tokens),
                       questions=sorted(set(question)))
        return out

    n_steps = len(spec["steps"])
    work = Path(spec["work"]) / "trl"
    config = GRPOConfig(
        output_dir=str(work), use_cpu=True, per_device_train_batch_size=spec["prompts"] * spec["group"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=spec["group"], max_completion_length=spec["max_tokens"], beta=spec["beta"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        temperature=1.0, top_p=1.0, top_k=0, max_steps=n_steps, logging_strategy="no", save_strategy="no",
        report_to="none", shuffle_dataset=False, seed=spec["seed"], use_vllm=False, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(folder), reward_funcs=reward, args=config,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=hf_tok)
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        with torch.profiler.record_function("ROLLOUT"):
            out = generate(*a, **k)
        current["rollout_s"] = current.get("rollout_s", 0.0) + time.perf_counter() - t0
        return out

    trainer._generate_single_turn = timed_generate

    class Lockstep(transformers.TrainerCallback):
        """Each optimiser step waits for the parent's go and reports when done."""

        prof, cpu0 = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            assert conn.recv() == "step"
            current.clear()
            common.reset_peak_rss()
            self.prof = _profiler(spec, state.global_step, n_steps)
            self.cpu0 = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            expected = sorted(p.question for p in spec["steps"][state.global_step - 1])
            current["same_prompts"] = current.pop("questions", None) == expected
            current["cpu_s"] = time.process_time() - self.cpu0
            conn.send({**current, "profile": _profile_table(self.prof), "peak_rss_mb": common.peak_rss_mb()})

    trainer.add_callback(Lockstep())
    conn.send(("ready", common.peak_rss_mb()))
    trainer.train()
    assert conn.recv() == "finish"
    final = work / "final"
    trainer.model.save_pretrained(final)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, final / name)
    conn.send({"heldout": _heldout(final, spec)})


def main(argv=None) -> None:
    args = parse_args(argv)
    common.start(args.threads)
    from pocketr1.train.grpo import draw_problems

    info = common.machine()
    print(common.describe(info))
    n_steps = 1 + args.rounds * args.steps_per_round + args.profile  # --profile: one more, untimed
    steps = [draw_problems(["arithmetic"], {}, args.prompts, args.seed * 7919 + s) for s in range(n_steps)]
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as work:
        folder = args.base or Path(work) / "model"
        if not args.base:
            common.build_model_folder(folder, args.seed)
        spec = {"folder": str(folder), "work": work, "steps": steps, "prompts": args.prompts, "group": args.group,
                "max_tokens": args.max_tokens, "beta": args.beta, "lr": args.lr, "seed": args.seed,
                "threads": args.threads, "eval_problems": args.eval_problems, "profile": args.profile}
        ctx = mp.get_context("spawn")
        conns, procs, setup_rss = {}, {}, {}
        for side, target in (("trl", trl_worker), ("pocketr1", pocketr1_worker)):
            parent, child = ctx.Pipe()
            procs[side] = ctx.Process(target=target, args=(child, spec), daemon=True)
            procs[side].start()
            child.close()  # a worker that dies then reads as EOFError here, not a hang
            conns[side] = parent
        for side in SIDES:
            _, setup_rss[side] = conns[side].recv()
        records = {side: [] for side in SIDES}

        def step(side: str) -> dict:
            t0 = time.perf_counter()
            conns[side].send("step")
            reply = conns[side].recv()
            return reply | {"seconds": time.perf_counter() - t0}

        for side in SIDES:  # warm-up step (counted for the reward, not the timing)
            records[side].append(step(side) | {"warmup": True})
        for r in range(args.rounds):
            for side in SIDES if r % 2 else SIDES[::-1]:  # alternate who goes first
                for _ in range(args.steps_per_round):
                    records[side].append(step(side) | {"warmup": False})
        if args.profile:
            for side in SIDES:
                records[side].append(step(side) | {"warmup": False})
        final = {}
        for side in SIDES:
            conns[side].send("finish")
            final[side] = conns[side].recv()
            procs[side].join(timeout=60)

    rows = {}
    for side in SIDES:
        timed = [x for x in records[side] if not x["warmup"] and not x.get("profile")]
        secs = common.median([x["seconds"] for x in timed])
        roll = common.median([x["rollout_s"] for x in timed])
        tokens = sum(x["tokens"] for x in timed)
        rows[side] = {
            "seconds_per_step": round(secs, 3), "rollout_seconds": round(roll, 3),
            "cpu_seconds_per_step": round(common.median([x["cpu_s"] for x in timed]), 3),
            "rollout_tokens_per_s": round(tokens / sum(x["rollout_s"] for x in timed), 1),
            "completion_tokens_per_s_per_step": round(tokens / sum(x["seconds"] for x in timed), 1),
            "mean_completion_tokens": round(tokens / len(timed) / (args.prompts * args.group), 2),
            "reward_last_step": round(records[side][-1]["reward"], 4),
            "reward_mean_all_steps": round(sum(x["reward"] for x in records[side]) / n_steps, 4),
            "accuracy_mean_all_steps": round(sum(x["accuracy"] for x in records[side]) / n_steps, 4),
            "heldout_pass1_after": final[side]["heldout"],
            "peak_rss_mb": max(x["peak_rss_mb"] or 0 for x in records[side] if not x.get("profile")) or None,
            "setup_rss_mb": setup_rss[side],
            "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in x.items() if k != "profile"}
                      for x in records[side]],
        }
    same = all(x.get("same_prompts", True) for x in records["trl"])
    pr = records["pocketr1"]
    packed_share = sum(final["pocketr1"]["packed_slots"]) / sum(x["padded_positions"] for x in pr)
    ratio = rows["trl"]["seconds_per_step"] / rows["pocketr1"]["seconds_per_step"]
    roll_ratio = rows["pocketr1"]["rollout_tokens_per_s"] / rows["trl"]["rollout_tokens_per_s"]
    cpu_ratio = rows["trl"]["cpu_seconds_per_step"] / rows["pocketr1"]["cpu_seconds_per_step"]

    print(f"\n{args.prompts} prompts x G={args.group}, <= {args.max_tokens} tokens, beta {args.beta}, lr {args.lr}, "
          f"{n_steps} steps each ({args.rounds} rounds x {args.steps_per_round} timed + 1 warm-up"
          f"{' + 1 profiled' if args.profile else ''}); model: "
          f"{args.base or 'random tiny Qwen2'}")
    print(f"{'side':<9} {'s/step':>7} {'rollout s':>9} {'rollout tok/s':>13} {'tok/completion':>14} "
          f"{'reward last':>11} {'reward mean':>11} {'held-out':>8} {'peak RSS MB':>11}")
    for side in SIDES:
        x = rows[side]
        held = f"{x['heldout_pass1_after']:.3f}" if x["heldout_pass1_after"] is not None else "-"
        print(f"{side:<9} {x['seconds_per_step']:>7.2f} {x['rollout_seconds']:>9.2f} "
              f"{x['rollout_tokens_per_s']:>13.0f} {x['mean_completion_tokens']:>14.1f} "
              f"{x['reward_last_step']:>11.3f} {x['reward_mean_all_steps']:>11.3f} "
              f"{held:>8} {x['peak_rss_mb'] or 0:>11.0f}")
    before = final["pocketr1"]["heldout_before"]
    if before is not None:
        print(f"held-out pass@1 of the starting model (the same evaluator): {before:.3f}")
    print(f"\npocket-r1 vs TRL, medians: {ratio:.2f}x faster per step, {roll_ratio:.2f}x rollout tokens/s "
          f"(target >= 5x per step: {'met' if ratio >= 5 else 'missed'}); same prompts every step: {same}")
    trl_cpu, our_cpu = rows["trl"]["cpu_seconds_per_step"], rows["pocketr1"]["cpu_seconds_per_step"]
    print(f"CPU time per step (the worker process's, all threads; what other processes' load disturbs least): "
          f"TRL {trl_cpu:.2f} s, pocket-r1 {our_cpu:.2f} s: {cpu_ratio:.2f}x.")
    print("Peak RSS: each side's own worker process during its (unprofiled) steps: model, reference, optimiser, "
          "activations.")
    print(f"pocket-r1's update batch, tree-packed (each prompt once, no padding): {packed_share:.0%} of the positions "
          f"of the left-padded prompt + completion rectangle.")
    for side in SIDES:
        table = records[side][-1].get("profile")
        if table:
            print(f"\n{side}, last step under torch.profiler (ROLLOUT / UPDATE: the phases):\n{table}")

    info["load_average_end"] = common.os.getloadavg()
    result = {"benchmark": "grpo", "machine": info, "model": str(args.base) if args.base else common.MODEL,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
              | {"steps_total": n_steps, "loss": "grpo (per-sequence mean), group-std advantages, eps 0.2",
                 "precision": "each side's default: TRL bf16=True; pocket-r1 dtype=auto"},
              "rows": rows, "speedup_per_step": round(ratio, 2), "cpu_time_ratio_per_step": round(cpu_ratio, 2),
              "rollout_tokens_per_s_ratio": round(roll_ratio, 2), "heldout_pass1_before": before,
              "same_prompts": same, "pocketr1_update_packed_vs_padded": round(packed_share, 3),
              "profiles": {side: records[side][-1].get("profile") for side in SIDES}}
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
