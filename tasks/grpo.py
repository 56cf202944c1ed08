"""grpo: group relative policy optimisation with TRL's GRPOTrainer and verifiable rewards.

For each prompt the policy samples `group_size` replies; each reply's reward is checked against the prompt's
known answer (no learned judge to exploit), and its advantage is its reward relative to the group's. The
reward is a weighted sum of: correct (1 when the reply's answer equals the known answer exactly), partial
(credit for a near miss, denser than exact match for a model that is rarely right), format (1 when the reply
is one short non-empty line that ends its turn) and, optionally, the learned reward model's score. A KL penalty (kl_coef) holds the policy near the frozen starting policy.
Policy and reference = the SFT (or merged LoRA) model. Measured before and after on held-out prompts, as
ppo and dpo are (`lmforge.training.policy_eval`): ground-truth exact match, reward-model score, KL from the reference.
Output: out/model (policy, loads with `AutoModelForCausalLM`, tokenizer beside it), out/curves.csv,
out/samples.jsonl.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from lmforge import distributed
from lmforge.data import posttrain_data
from lmforge.training import resume
from lmforge.training.callbacks import OnLog
from lmforge.chat import end_token, end_token_id
from lmforge.config import GrpoConfig
from lmforge.models import load_tokenizer
from lmforge.training.policy_eval import check_same_tokenizer, measure, measure_start, query_ids
from lmforge.training.scoring import score_ids
from lmforge.training.alignment import before_after, load_policies, publish_policy
from lmforge.training.skeleton import log_before, trainer_args
from lmforge.errors import InputError
from lmforge.stage import cli
from lmforge.tracking import Tracker

MAX_ANSWER_CHARS = 40  # a well-formed reply to the built-in tasks is a number or two words
CURVES = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "entropy": "entropy",
          "rewards/correct/mean": "correct", "rewards/partial/mean": "partial", "rewards/format/mean": "format", "rewards/reward_model/mean": "rm_score",
          "completions/mean_length": "reply_tokens", "loss": "loss"}


# ----------------------------------------------------------------------------------------- rewards
def _partial(text: str, answer: str) -> float:
    """Credit for a near miss: a number close to a numeric answer (1 at the answer, 0 at twice its distance
    from zero or more), or the share of the answer's words in their place."""
    if answer.isdigit():
        if not text.isdigit():
            return 0.0
        return max(0.0, 1.0 - abs(int(text) - int(answer)) / (int(answer) + 1))
    want, got = answer.split(), text.split()
    return sum(w == g for w, g in zip(want, got)) / max(len(want), len(got)) if want else 0.0


def verify(reply: str, answer: str, ended: bool) -> dict[str, float]:
    """The verifiable rewards of one reply (its text without special tokens) to a prompt whose answer is known:
    correct = the reply's answer is exactly the known one; partial = how near a miss is (1 when correct);
    format = one short non-empty line that ended its turn."""
    text = posttrain_data.extract(reply)
    well_formed = ended and bool(text) and "\n" not in text and len(text) <= MAX_ANSWER_CHARS
    return {"correct": posttrain_data.score(reply, answer), "partial": round(_partial(text, answer.strip()), 4),
            "format": 1.0 if well_formed else 0.0}


def _reply_text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def reward_functions(tokenizer, cfg: GrpoConfig, reward_model=None) -> tuple[list, list[float]]:
    """GRPOTrainer's reward functions (named for its logs: rewards/<name>/mean) and their weights."""
    end_id = end_token_id(tokenizer)

    def correct(completions, completion_ids, answer, **_):
        return [verify(_reply_text(c), a, end_id in ids)["correct"] for c, ids, a in zip(completions, completion_ids, answer)]

    def partial(completions, completion_ids, answer, **_):
        return [verify(_reply_text(c), a, end_id in ids)["partial"] for c, ids, a in zip(completions, completion_ids, answer)]

    def format(completions, completion_ids, answer, **_):  # noqa: A001  (the name TRL logs)
        return [verify(_reply_text(c), a, end_id in ids)["format"] for c, ids, a in zip(completions, completion_ids, answer)]

    funcs, weights = [correct, partial, format], [cfg.correct_weight, cfg.partial_weight, cfg.format_weight]
    if cfg.reward_model_weight > 0:
        def reward_model_score(prompts, completion_ids, **_):
            seqs = [query_ids(tokenizer, p) + list(ids) for p, ids in zip(prompts, completion_ids)]
            return score_ids(reward_model, seqs, tokenizer.pad_token_id).tolist()

        reward_model_score.__name__ = "reward_model"
        funcs.append(reward_model_score)
        weights.append(cfg.reward_model_weight)
    return funcs, weights


# -------------------------------------------------------------------------------------------- data
def training_prompts(cfg: GrpoConfig) -> list[dict]:
    """User prompt files (each row needs its "answer"; validated first) plus the built-in train prompts."""
    rows = []
    for path in cfg.data_files:
        for lineno, row in enumerate(posttrain_data.load_jsonl(path, "prompt"), 1):
            if "answer" not in row:
                raise InputError(f'{path}:{lineno}: grpo needs an "answer" string in every row to verify replies against')
            p = row["prompt"]
            rows.append({"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p, "answer": row["answer"]})
    rows.extend({"prompt": r["prompt"], "answer": r["answer"]} for r in posttrain_data.prompts("train", cfg.train_prompts, cfg.seed))
    if len(rows) < cfg.prompts_per_step:
        raise InputError(f"grpo: {len(rows)} training prompts, fewer than one step's prompts_per_step ({cfg.prompts_per_step})")
    return rows


def make_trainer(cfg: GrpoConfig, model, tokenizer, rows: list[dict], work: Path, device: str, reward_model, callbacks,
                 checkpoints: bool = False):
    from datasets import Dataset
    from trl import GRPOConfig as TrlGrpoConfig
    from trl import GRPOTrainer

    # TRL stops sampling and masks replies at its tokenizer's eos; a chat turn ends at <|end|>, so its copy says so
    gen_tok = copy.deepcopy(tokenizer)
    gen_tok.eos_token = end_token(tokenizer)
    funcs, weights = reward_functions(tokenizer, cfg, reward_model)
    args = TrlGrpoConfig(
        max_steps=cfg.max_steps,
        per_device_train_batch_size=distributed.per_process(cfg.prompts_per_step * cfg.group_size, "prompts_per_step x group_size"),
        num_generations=cfg.group_size,
        max_completion_length=cfg.response_length,
        temperature=cfg.temperature,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        beta=cfg.kl_coef,
        epsilon=cfg.epsilon,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        reward_weights=weights,
        **trainer_args(cfg, work, device, checkpoints=checkpoints),  # resumable: see lmforge.training.resume
    )
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=gen_tok, callbacks=callbacks)


# ------------------------------------------------------------------------------------------- stage
def run(cfg: GrpoConfig, *, policy: Path, reward_model: Path, out: Path, tracker: Tracker,
        checkpoints: Path | None = None) -> dict:
    """GRPO with verifiable rewards from the starting policy, measured before and after on held-out prompts."""
    from transformers import set_seed

    rows = training_prompts(cfg)  # before anything heavy
    tok = load_tokenizer(policy)
    check_same_tokenizer(tok, policy, reward_model)
    test = posttrain_data.prompts("test", cfg.test_prompts, cfg.seed)

    set_seed(cfg.seed)
    device, model, ref, rm = load_policies("grpo", cfg, policy, reward_model, tok, tracker, prompts_total=len(rows))
    kw = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.response_length, reward_model=rm, seed=cfg.seed)
    before, samples_before = measure_start(policy, reward_model, model, tok, test, suffix="_before", **kw)
    log_before(tracker, before)

    curves: list[dict] = []

    def collect(step: int, logs: dict) -> None:
        row = {CURVES[k]: float(v) for k, v in logs.items() if k in CURVES}
        if row:
            curves.append({"step": step, **row})
            tracker.log_metrics({f"rollout/{k}": v for k, v in row.items()}, step=step)

    eos = model.config.eos_token_id  # the trainer aligns the config with its <|end|> copy; saved models keep theirs
    read_in_training = [policy] + ([reward_model] if cfg.reward_model_weight > 0 else [])  # what training reads
    on_log = OnLog(collect)
    with resume.Resumable("grpo", checkpoints, resume.fingerprint(cfg, read_in_training, rows), out) as run:
        trainer = make_trainer(cfg, model, tok, rows, run.work, device.type, rm, [on_log], checkpoints=run.saves)
        result = run.train(trainer.train, on_log)  # with the killed attempt's curves
    model = trainer.model
    model.config.eos_token_id = eos

    after, samples_after = measure(model, tok, test, ref=ref, **kw)
    tail = curves[-5:]
    metrics = {
        **before_after(before, after, samples_before, samples_after),
        "train_reward_first": round(curves[0]["reward"], 4) if curves and "reward" in curves[0] else None,
        "train_reward_last": round(sum(r.get("reward", 0.0) for r in tail) / len(tail), 4) if tail else None,
        "kl_last": round(sum(r.get("kl", 0.0) for r in tail) / len(tail), 4) if tail and cfg.kl_coef > 0 else None,
        "resumed_from_step": run.step,
        "steps": result.global_step, "episodes": result.global_step * cfg.prompts_per_step * cfg.group_size,
        "train_prompts": len(rows), "test_prompts": len(test), "train_s": round(run.seconds, 2),
    }
    # the stage's tokenizer (eos <|endoftext|>) is saved, not the trainer's copy
    publish_policy(out, "grpo", cfg, metrics, {"policy": policy, "reward_model": reward_model}, model, tok, tracker,
                   test=test, samples_before=samples_before, samples_after=samples_after, curves=curves)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("grpo", run, inputs=("policy", "reward_model"), argv=argv, options=resume.OPTION)


if __name__ == "__main__":
    sys.exit(main())
