"""Typed configs (pydantic) and the shipped profiles (`kat_core/profiles/*.yaml`).

A profile is a YAML file of overrides over the defaults below; `--set key=value` (dotted keys, YAML
values) overrides further. Unknown keys are errors that name the key, so a typo never passes silently.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kat_core.errors import KatError

PROFILES_DIR = Path(__file__).parent / "profiles"


# The cross-field and catalogue checks below are the ones the stages would otherwise make minutes into a run
# (a run's config is loaded, hence checked, by `--set`, the dashboard's form, /api/config/check, schedules and
# every stage alike): nothing is queued that a stage would refuse.

def _known_families(names: list[str], *, split: str | None = None) -> list[str]:
    """`names` if each is a known task family (with `split`, when given), else ValueError listing them."""
    from kat_core.tasks.base import known_tasks, task_splits

    for name in names:
        splits = task_splits(name)
        if splits is None:
            raise ValueError(f"unknown task family {name!r}; known: {', '.join(known_tasks())}")
        if split and split not in splits:
            having = [n for n in known_tasks() if split in (task_splits(n) or ())]
            raise ValueError(f"task family {name!r} has no {split} split (it is an evaluation set); "
                             f"families with one: {', '.join(having)}")
    return names


class _Strict(BaseModel):
    # no setting is infinite or NaN: `train.lr=1e999` passed `gt=0` and queued a run that could only diverge
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TasksConfig(_Strict):
    benchmarks_dir: str | None = Field(None, description="folder of the public benchmark files")


class OpenAIAgentConfig(_Strict):
    """An OpenAI-compatible endpoint for the `openai` agent backend; unset values come from the
    environment (OPENAI_BASE_URL, OPENAI_API_KEY, KAT_AGENT_MODEL)."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = Field(None, description="prefer OPENAI_API_KEY in the environment")
    timeout_s: float = 60.0
    temperature: float = 0.0


class SynthConfig(_Strict):
    families: dict[str, int] = Field(
        default_factory=lambda: {"arith": 400}, description="items per task family (train split)"
    )
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], description="arith difficulty levels")
    tag_threshold: float = Field(0.3, ge=0, le=1, description="complexity below this is tagged think-off")
    mirror_share: float = Field(
        0.5, ge=0, le=1, description="share of items also rendered in the other regime"
    )
    agent_backend: Literal["programmatic", "openai"] = "programmatic"
    draft_error_rate: float = Field(
        0.15, ge=0, le=1, description="programmatic backend: share of drafts with an injected error"
    )
    max_attempts: int = Field(2, ge=1, description="solver attempts per think-on item before it is rejected")
    shard_size: int = Field(5000, ge=1)
    pool: int = Field(600, ge=0, description="prompts of the held-out pool (the families' `pool` split, never in "
                      "pretraining): half for the cold start's labels, half for RL")
    openai: OpenAIAgentConfig = Field(default_factory=OpenAIAgentConfig)

    @field_validator("families")
    @classmethod
    def _known_train_families(cls, v: dict[str, int]) -> dict[str, int]:
        if not v or not any(v.values()):
            raise ValueError("give at least one task family with items, e.g. {arith: 400}")
        bad = [f"{k}: {n}" for k, n in v.items() if not isinstance(n, int) or n < 0]
        if bad:
            raise ValueError(f"item counts must be whole numbers >= 0, not {bad[0]}")
        _known_families(list(v), split="train")
        return v

    @field_validator("levels")
    @classmethod
    def _arith_levels(cls, v: list[int]) -> list[int]:
        from kat_core.tasks.arith import LEVELS

        if not v or any(level not in LEVELS for level in v):
            raise ValueError(f"arith levels are a non-empty list of {', '.join(map(str, LEVELS))}, not {v}")
        return v


class ValidateConfig(_Strict):
    mode_share_min: float = Field(0.2, ge=0, le=1, description="minimum share of each mode")
    mode_share_max: float = Field(0.8, ge=0, le=1, description="maximum share of each mode")
    min_tokens: int = Field(4, ge=0, description="shortest completion, in approximate tokens")
    max_tokens: int = Field(1024, ge=1, description="longest prompt+completion, in approximate tokens")
    overlap_suites: list[str] = Field(
        default_factory=lambda: ["arith", "gsm8k", "math500", "aime24", "humaneval", "mbpp"],
        description="evaluation sets whose prompts must not appear in training data",
    )
    ngram: int = Field(13, ge=3, description="n for n-gram overlap with evaluation prompts")
    near_dup_n: int = Field(6, ge=3, description="character n for near-duplicates of evaluation prompts")
    near_dup_threshold: float = Field(
        0.6, gt=0, le=1, description="share of informative character n-grams shared that makes a near-duplicate"
    )
    verify_max: int = Field(
        10_000, ge=0, description="records per family whose answers are re-verified (all if fewer; 0: none)"
    )

    @field_validator("overlap_suites")
    @classmethod
    def _known_overlap_suites(cls, v: list[str]) -> list[str]:
        return _known_families(v)

    @field_validator("mode_share_max")
    @classmethod
    def _max_above_min(cls, v: float, info: ValidationInfo) -> float:
        low = info.data.get("mode_share_min")
        if low is not None and v < low:
            raise ValueError(f"must be at least mode_share_min ({low}), got {v}")
        return v


class ModelConfig(_Strict):
    """The causal LM: a hub id or local path (`base`), or a fresh small Llama-style model from the sizes."""

    base: str | None = Field(None, description="HF model dir or hub id; None builds a fresh model")
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1, description="attention heads; they divide hidden_size into even head sizes")
    intermediate_size: int = Field(384, ge=1)
    max_seq_len: int = Field(320, ge=16)
    vocab_size: int = Field(512, ge=1, description="BPE vocabulary size when training a tokenizer")
    mtp_depth: int = Field(1, ge=0, description="number of sequential MTP modules (0 disables)")

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_hidden(cls, v: int, info: ValidationInfo) -> int:
        hidden = info.data.get("hidden_size")
        if hidden is not None and hidden % v:
            raise ValueError(f"{v} heads do not divide hidden_size {hidden}")
        if hidden is not None and (hidden // v) % 2:
            raise ValueError(f"hidden_size {hidden} / {v} heads = head size {hidden // v}, which must be even "
                             "(rotary position embeddings)")
        return v


class TrainConfig(_Strict):
    """The training engine (shared by pretrain, coldstart and srpo)."""

    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = Field(0, ge=0, le=3)
    bf16: Literal["auto", True, False] = Field("auto", description="auto: bf16 where the hardware has it")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip (0: none)")
    steps: int = Field(200, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    checkpoint_every: int = Field(50, description="steps between checkpoints (0 or less: only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)


class PretrainConfig(_Strict):
    """Loss = alpha*CE + (1-alpha)*T^2*KL(teacher_T || student_T) + mtp_lambda*mean_k CE_k."""

    alpha: float = Field(0.5, ge=0, le=1, description="CE weight when a teacher is given (1 without one)")
    kd_temperature: float = Field(2.0, gt=0)
    mtp_lambda: float = Field(0.3, ge=0)
    mode_token_weight: float = Field(3.0, ge=1, description="extra CE weight on the decision: the judge's verdict "
                                     "word (think / direct) and the mode token (kat_core.train.data)")
    pack_len: int | None = Field(
        None, ge=16, description="tokens per packed training row (None: model.max_seq_len); rows a few examples "
        "long cost less attention per token than rows of the whole context")
    teacher_top_k: int = Field(32, ge=1, description="top-k teacher logits kept (teacher_once, cache-teacher)")
    teacher_once: bool = Field(True, description="run a teacher checkpoint once over the packed rows and distil "
                               "from its top-k logits (cheap over many epochs); False: full logits every step")
    train_teacher: bool = Field(False, description="the pipeline first trains a larger teacher")
    replay_repeats: int = Field(
        0, ge=0, description="a pretrained base (model.base): times its own greedy answers to everyday requests "
        "(kat_core.data.replay) are trained on beside the dataset, so it keeps them (0: none)")
    replay_max_new_tokens: int = Field(96, ge=8, description="token budget of each replayed answer; a longer "
                                       "one keeps its whole sentences, and its end is not trained")
    replay_kl: float = Field(
        0.0, ge=0, description="weight of KL(base || model) on the replayed answers' tokens: the base's whole "
        "next-token distribution there (its top-k, teacher_top_k), not only its greedy token (0: off)")
    teacher_model: ModelConfig | None = None
    teacher_train: TrainConfig | None = None


class AutoThinkConfig(_Strict):
    """The one decision criterion (kat_core.autothink), read by the cold start's labels, the RL's decision
    reward and the evaluation's oracles: the value of mode m on a prompt is
    `accuracy_m - token_cost * tokens_m / token_budget`; think-off is right when `V_off >= V_on - delta`."""

    token_cost: float = Field(0.2, ge=0, description="value lost per `token_budget` tokens of response")
    token_budget: int = Field(160, ge=1, description="tokens that cost `token_cost` (the response budget)")
    delta: float = Field(0.02, ge=0, le=1, description="think-off wins when its value is within delta of "
                         "think-on's (HiPO's tie-break towards the cheap mode; RL's bias omega)")
    decoding: Literal["greedy"] | float = Field(
        "greedy", description="the decoding the modes are valued under: greedy (as the evaluation decodes), "
        "or a sampling temperature > 0 (then the mean over the samples drawn at it)")
    min_cell: int = Field(4, ge=1, description="cold start, RL census and the evaluation's cell oracle: a feature "
                          "cell with fewer measured prompts takes its level's verdict")
    tie_z: float = Field(1.645, ge=0, description="a feature cell thinks only when its mean V_on - V_off edge "
                         "exceeds tie_z standard errors of that mean (one-sided 95%); an edge within the "
                         "measurement's noise is a tie, and ties go to think-off (kat_core.autothink.CellTally)")
    accuracy_first: bool = Field(True, description="a tie within the noise thinks when think-on is measurably more "
                                 "accurate (its mean accuracy edge less tie_z standard errors is above 0), and goes "
                                 "to think-off otherwise (kat_core.autothink.CellTally)")

    @field_validator("decoding")
    @classmethod
    def _positive_temperature(cls, v: Any) -> Any:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("decoding is 'greedy' or a sampling temperature > 0")
        return v

    @property
    def temperature(self) -> float:
        """The sampling temperature the modes are valued under (0: greedy)."""
        return 0.0 if self.decoding == "greedy" else float(self.decoding)


class ColdStartConfig(_Strict):
    """Cold start: label each held-out prompt's mode from the model's own forced answers (the `autothink`
    criterion, per feature cell), then SFT on the labelled responses."""

    prompts: int = Field(300, ge=1, description="training prompts to label")
    k: int = Field(4, ge=1, description="samples per prompt in each forced mode when autothink.decoding is a "
                   "temperature (greedy: one answer per mode)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(160, ge=8)
    batch_size: int = Field(64, ge=1)
    rounds: int = Field(1, ge=1, le=5, description="labelling rounds: each later round measures the labelled "
                        "prompts again on the previous round's model and relabels them; when a label changed, the "
                        "student is fine-tuned again on the new labels, else that model is the cold start. Labels "
                        "measured on the student can be wrong for the model the SFT makes of it (README, \"Labels "
                        "for the model that decides\")")
    judge_samples: int = Field(0, ge=0, le=16, description="judges the model writes itself per labelled prompt "
                               "(auto mode, temperature 1); each that misdescribes its request adds a copy of the "
                               "prompt's thinking SFT example under it (and a misreading that is another cell's "
                               "description brings that cell's own traces under it), the judge and decision masked "
                               "from the loss, the SFT's steps grown to match: the trace learns to follow the "
                               "request, not a misread description (kat_core.train.coldstart.misread_copies)")
    align_steps: int = Field(0, ge=0, description="after the SFT, check each feature cell's decision against the "
                             "verdict measured on the fine-tuned model (both modes, greedy, on the RL prompts it never "
                             "trained on); where most of a cell's prompts are decided against it, fine-tune the "
                             "decision tokens alone for this many steps (0: no check). Labels measured on the student "
                             "can be wrong for the model the SFT makes of it (kat_core.train.decisions)")
    align_lr: float = Field(5e-5, gt=0, description="learning rate of the decision alignment (align_steps)")
    min_well_formed: float = Field(0.0, ge=0, le=1, description="share of the forced answers that must be well "
                                   "formed, else the stage fails (labels measured on answers the grammar cannot "
                                   "read say nothing about the model); 0 only warns when none is")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=60, lr=3e-4, warmup_steps=5))


class SrpoConfig(_Strict):
    """Reinforcement learning after the cold start (kat_core.train.srpo). One rollout = `prompts_per_step`
    prompts from the dataset's held-out RL pool, each answered per the algorithm's plan; each rollout feeds
    `updates_per_rollout` optimizer steps (PPO-style reuse: the clipped ratio matters from the second update
    on). `train.steps` counts optimizer steps. The decision criterion is the `autothink` section's."""

    algo: Literal["step_srpo", "grpo", "decoupled", "adaptthink"] = Field(
        "step_srpo", description="step_srpo: paired-mode (both modes measured per prompt, the decision trained "
        "on their value difference); grpo: one scalar reward on all tokens; decoupled: grpo's reward with the "
        "control (judge) tokens' loss weighted apart (Thinkless); adaptthink: half the samples forced into each "
        "mode, importance-weighted decision (AdaptThink)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per rollout (levels in turn)")
    samples_per_mode: int = Field(3, ge=1, description="step_srpo: sampled answers per prompt forced into each "
                                  "mode (they train both modes' answers)")
    policy_samples: int = Field(2, ge=0, description="step_srpo: answers per prompt in the mode the policy picks")
    group_size: int = Field(8, ge=2, description="grpo, decoupled, adaptthink: G samples per prompt")
    decision_weight: float = Field(0.3, ge=0, description="step_srpo, adaptthink: weight of the decision loss "
                                   "(measured: 1.0 moved level 4 further from the cold start's decisions, README)")
    decision_target: Literal["cell", "prompt"] = Field(
        "cell", description="step_srpo: the decision advantage of a prompt is its feature cell's mean preference "
        "over the whole RL pool, measured on the starting policy before the first step (cell: what a mode "
        "selector can act on, the same for every seed), or the prompt's own, measured in its rollout (prompt: a "
        "rare miss pushes its whole level)")
    decision_weighting: Literal["value", "sign"] = Field(
        "value", description="step_srpo: each prompt's decision loss weighs |A_dec| (value: the regret at stake), "
        "or 1 towards the better arm (sign: steadier decisions, but measured to cost level 4's direct answers "
        "accuracy, README)")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range for the importance ratio")
    kl_beta: float = Field(0.05, ge=0, description="weight of the exact KL to the reference (0: no reference)")
    control_weight: float = Field(1.0, ge=0, description="decoupled: weight of the control-token loss")
    adv_std_floor: float = Field(0.1, ge=0, description="grpo/decoupled: advantages divide by max(std, this)")
    updates_per_rollout: int = Field(2, ge=1, description="optimizer steps per rollout")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (the criterion's "
                               "when autothink.decoding is a temperature)")
    max_new_tokens: int = Field(160, ge=8)
    prompts: int | None = Field(None, ge=1, description="size of the prompt pool (None: every RL prompt)")
    probe_per_level: int = Field(8, ge=0, description="RL prompts per level held out as the decision probe")
    probe_every: int = Field(4, ge=1, description="steps between probes of the greedy decision")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        steps=40, lr=2e-5, warmup_steps=2, min_lr_ratio=1.0, micro_batch_size=32, checkpoint_every=10,
        log_every=2))


class EvalConfig(_Strict):
    """The `evaluate` stage: suites, modes and sample counts (see kat_core.eval.evaluate)."""

    suites: list[str] = Field(default_factory=lambda: ["arith"], description="task families to evaluate on")
    modes: list[Literal["auto", "on", "off", "plain"]] = Field(
        default_factory=lambda: ["auto", "on", "off"],
        description="auto, on, off, and plain (the model's own chat template, no grammar)")
    limit: int | None = Field(200, ge=1, le=100_000, description="items per suite (None: the whole test split)")
    n_samples: int = Field(2, ge=0, description="sampled responses per item and mode for pass@1 and the oracle")
    oracle_items: int = Field(0, ge=0, le=100_000, description="other test items per suite answered in both forced "
                              "modes, on which the feature-cell oracle decides its cells (0: on the evaluated items "
                              "themselves, whose cells hold a few dozen items each)")
    temperature: float = Field(0.7, ge=0)
    max_new_tokens: int = Field(160, ge=1)

    @field_validator("modes", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false: `--set evaluate.modes=[on,off]` means the modes
        if not isinstance(v, list):
            return v
        return [("on" if m else "off") if isinstance(m, bool) else m for m in v]

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one evaluation suite, e.g. [arith]")
        return _known_families(v)


class SpeculativeConfig(_Strict):
    """Self-speculative decoding (kat_core.speculative): the checkpoint's MTP module drafts tokens, the model
    verifies them in one forward; greedy outputs and sampled distributions stay plain decoding's. Read by the
    evaluation and the RL stage's rollouts (`kat generate`, `kat eval run` and `kat serve-model` take
    --draft-tokens)."""

    draft_tokens: int = Field(0, ge=0, le=8, description="tokens the MTP module drafts per decode step (0: plain "
                              "decoding; a checkpoint without MTP weights decodes plainly, with one log line)")


class RegistryConfig(_Strict):
    """The `register` stage: the registered model's name and the promotion gate's margins."""

    model_name: str = Field("kat", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="letters, digits, "
                            "'.', '_' and '-' (at most 128): the name the CLI, the dashboard and serve-model refer "
                            "to; MLflow takes any name, but a run that registered another could not be promoted")
    acc_margin: float = Field(0.01, ge=0, description="accuracy differences within this count as equal")
    tok_margin: float = Field(0.05, ge=0, description="relative token saving needed at equal accuracy")
    min_accuracy: float = Field(0.05, ge=0, le=1, description="no model becomes champion below this accuracy, "
                                "not even the first")
    min_well_formed: float = Field(0.5, ge=0, le=1, description="no model becomes champion when a smaller share "
                                   "of its answers follows the response grammar, not even the first")


class ImagesConfig(_Strict):
    """The container images of the pipeline on a cluster (built from infra/images): `{registry}/{cpu}:{tag}`
    runs the data and evaluation tasks, `{registry}/{cuda}:{tag}` the training tasks and their TrainJobs."""

    registry: str = "ghcr.io/kat-platform"
    cpu: str = Field("kat", description="repository of the CPU image (infra/images/Dockerfile)")
    cuda: str = Field("kat-cuda", description="repository of the CUDA image (infra/images/Dockerfile.cuda)")
    tag: str = "0.1.0"

    def ref(self, kind: Literal["cpu", "cuda"]) -> str:
        return f"{self.registry.rstrip('/')}/{self.cpu if kind == 'cpu' else self.cuda}:{self.tag}"


class DistributedConfig(_Strict):
    """Multi-GPU training: a stage named in `stages` runs as a Kubeflow Trainer TrainJob of `nodes` x
    `gpus_per_node` DeepSpeed processes (kat_core.platform.trainjob) when that is more than one process;
    otherwise it trains in the pipeline task's own process."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    runtime: str = Field("deepspeed-distributed", description="Kubeflow Trainer (Cluster)TrainingRuntime")
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    stages: list[str] = Field(default_factory=lambda: ["pretrain", "pretrain-teacher", "srpo"],
                              description="stages that may run as a TrainJob")
    global_batch_size: int | None = Field(
        None, ge=1, description="sequences per optimizer step over all processes; when set, grad_accum is "
        "derived from it (it must be a multiple of micro_batch_size x world size)")
    cpu_per_node: str = "16"
    memory_per_node: str = "128Gi"
    timeout_s: int = Field(7 * 24 * 3600, ge=60, description="the TrainJob's active deadline")
    poll_s: int = Field(30, ge=1, description="how often the launching task polls the TrainJob")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class ClusterConfig(_Strict):
    """What the pipeline needs from a GPU Kubernetes cluster: images, GPU scheduling (the selector and
    tolerations must match the GPU nodes' labels and taints, see infra/README.md), and the names of the
    platform's secrets, config map, checkpoints PVC and service account (created by helm/kat-platform)."""

    images: ImagesConfig = Field(default_factory=ImagesConfig)
    accelerator: str = "nvidia.com/gpu"
    gpus: int = Field(1, ge=0, description="GPUs of a training task that trains in its own process (0: CPU only, "
                      "no GPU selector or tolerations; e.g. a kind test cluster)")
    cpu_request: str = "4"
    memory_request: str = "16G"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    s3_secret: str = "kat-s3"
    mlflow_secret: str = "kat-mlflow"
    config_map: str = "kat-platform"
    checkpoints_pvc: str = "kat-checkpoints"
    checkpoints_path: str = "/kat/checkpoints"
    service_account: str = "kat-pipeline-runner"
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class KatConfig(_Strict):
    profile: str = "smoke"
    purpose: str = Field("", description="what runs of this profile are for, printed with them (e.g. smoke: a "
                         "plumbing check whose model learns nothing)")
    seed: int = 0
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    autothink: AutoThinkConfig = Field(default_factory=AutoThinkConfig)
    coldstart: ColdStartConfig = Field(default_factory=ColdStartConfig)
    srpo: SrpoConfig = Field(default_factory=SrpoConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KatError(f"config key {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise KatError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:  # thousands of nested brackets: YAML's parser recurses
        raise KatError(f"--set {key.strip()}: the value is nested too deeply") from None
    except ValueError as e:  # what YAML builds can fail outside YAMLError: a 5000-digit int, the date 2020-13-45
        raise KatError(f"--set {key.strip()}: the value cannot be read ({e})") from None
    return key.strip(), value


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        name = field.alias or name
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def _explain(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _all_keys(KatConfig), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{source}: unknown config key {key!r}{hint}"
    given = first.get("input")
    shown = f" = {given!r}" if isinstance(given, int | float | str) and not isinstance(given, bool) else ""
    return f"{source}: config key {key!r}{shown}: {first['msg'].removeprefix('Value error, ')}"


def _over_defaults(default: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with every section it names filled in from the section's own default, recursively.

    Without this a profile that sets one key of a section with its own defaults (`srpo.train.steps: 60`)
    would get the *class* defaults for the rest of it (TrainConfig's lr 1e-3 rather than the srpo section's
    2e-5). Only sections (sub-models) merge; a dict-valued field such as `synth.families` is replaced."""
    out = dict(data)
    for name, field in type(default).model_fields.items():
        key = field.alias or name
        section = getattr(default, name)
        if isinstance(section, BaseModel) and isinstance(data.get(key), dict):
            out[key] = {**section.model_dump(by_alias=True), **_over_defaults(section, data[key])}
    return out


def load_config(profile: str = "smoke", overrides: list[str] | None = None) -> KatConfig:
    """The profile's config with `key=value` overrides applied; errors name the key."""
    import yaml

    path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise KatError(f"unknown profile {profile!r}; known: {', '.join(available_profiles())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise KatError(f"cannot read profile {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:  # a profile is user input: one line, no traceback
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(e, "problem", None) or getattr(e, "reason", None) or e
        raise KatError(f"profile {path} is not valid YAML: {reason}{where}") from None
    if not isinstance(data, dict):
        raise KatError(f"profile {path} must be a mapping of config keys, not a {type(data).__name__}")
    data.setdefault("profile", path.stem)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    try:
        return KatConfig.model_validate(_over_defaults(KatConfig(), data))
    except ValidationError as e:
        raise KatError(_explain(e, f"profile {path.stem}" + (" with --set" if overrides else ""))) from None


# What each pipeline stage reads of the config, by top-level key, in the DAG's order. A stage also depends on
# what the stages before it read (their outputs are its inputs), so its keys are its own plus all earlier
# ones. The pipeline hands each stage only the overrides of its keys: the stage's cache key (and its
# resumable work) then changes only when something it depends on does, so `--set evaluate.limit=500`
# re-runs evaluation and registration, not synthesis and training.
STAGE_READS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("synthesize", ("seed", "tasks", "synth")),
    ("validate", ("validate",)),
    ("pretrain", ("model", "train", "pretrain", "cluster")),  # pretrain-teacher too
    ("coldstart", ("autothink", "coldstart")),
    ("srpo", ("srpo", "speculative")),  # speculative: the RL samples other draws (same distribution)
    ("evaluate", ("evaluate",)),
    ("register", ("registry", "profile", "purpose")),
)
PIPELINE_STAGES = tuple(stage for stage, _ in STAGE_READS)


def stage_keys(stage: str) -> set[str]:
    """The top-level config keys `stage`'s result depends on (see STAGE_READS)."""
    stage = "pretrain" if stage == "pretrain-teacher" else stage
    if stage not in PIPELINE_STAGES:
        raise KatError(f"unknown pipeline stage {stage!r}; known: {', '.join(PIPELINE_STAGES)}")
    keys: set[str] = set()
    for name, reads in STAGE_READS:
        keys.update(reads)
        if name == stage:
            return keys
    raise AssertionError("unreachable")


def stage_overrides(stage: str, overrides: list[str]) -> list[str]:
    """The overrides `stage` depends on, in their order. A key no stage declares goes to every stage: a
    stage may rebuild once too often, never serve a result made with other settings."""
    keys = stage_keys(stage)
    declared = {key for _, reads in STAGE_READS for key in reads}
    kept = []
    for text in overrides:
        top = parse_override(text)[0].split(".")[0]
        top = "validate" if top == "validate_" else top
        if top in keys or top not in declared:
            kept.append(text)
    return kept
