"""`zoo distill RUN.yaml`: knowledge distillation of a teacher into a zoo student, with
linearisation (attention transfer) as an optional first stage.

    name: smollm2-hedgehog
    out_dir: runs/smollm2-hedgehog
    teacher: {source: smollm2-135m}          # a zoo model dir / `zoo train` out_dir / checkpoint,
                                             # a local transformers dir, or a short name
    student: {linearize: {mixer: {type: linear_attention, feature_map: hedgehog},
                          keep_attention: []}}
             # or {config: linear-attention-small, overrides: {...}}
    distill: {forward_kl: 1.0, reverse_kl: 0.0, ce: 0.0, hidden: 0.0, seq_kd: 0.0,
              temperature: 2.0, teacher_logits: online}   # online | cache
             # + lora: {rank: 8, alpha: 16, dropout: 0, targets: [q_proj, k_proj, v_proj,
             #   o_proj]}                             # stage 2 through LoRA (LoLCATs)
    transfer: {steps: 100, lr: 1.0e-2}       # stage 1 (linearised students only)
              # + attention_ce: 0.5       # + CE on attention weights (LoLCATs' xent;
              #                             window_linear_attention students)
    data: {tokenizer: teacher}               # train's data section; "teacher" = its tokenizer
    optim / train / checkpoint: as in `zoo train`

Teacher logits are computed on the fly (`teacher_logits: online`), or cached to disk
(`cache`): for every training window of seq_len tokens the teacher's top-k logits (k =
`cache_top_k`; 0 keeps the full vocabulary, sensible only for small vocabularies such as the
byte tokenizer's 256) are stored as float16 values and integer ids in numpy memmaps under
`<cache_dir>/<key>/`, filled lazily the first time a window is trained on. The key hashes the
teacher's weights, the token cache, seq_len and k, so any student distilled from the same
teacher on the same data reuses it. The top-k forward KL renormalises the teacher over its k
tokens (the mass outside them is dropped); reverse KL and hidden-state matching need the live
teacher and refuse the cache.

Sequence-level KD (`seq_kd` > 0): each step the teacher continues the first
`seq_kd_prompt_tokens` tokens of every sequence to seq_len tokens (sampling at
`seq_kd_temperature`; zoo teachers decode through their recurrent cache), and the student is
trained with cross-entropy on the generated tokens. It costs seq_len - prompt teacher decode
steps per training step.

LoRA in stage 2 (`distill.lora`, null = off): after stage 1, the replaced layers' projections
(`targets`; `layers` overrides which layers) get low-rank adapters (zoo.train.lora) and their
base weights freeze. `distill.trainable` then says what trains beside the adapters: `adapters`
(the default with LoRA) nothing (LoLCATs: the feature maps stay as stage 1 left them), `new` the
linearisation's new parameters, `mixers` the replaced mixers' other parameters; `all` is
refused, as it would train the weights the adapters stand in for. Checkpoints hold the adapters
unmerged (a resume re-injects them before loading); `final/` holds the merged student, a plain
zoo model.

Single process: the teacher and the student share one device (no DDP/FSDP here). Stage 2 runs
in the loop `zoo train` uses (zoo.train.loop): the same out_dir rules and lock, resume, stop
signals and metrics.

The modules, one job each: config (the run config), teacher (loading it, its tokenizer,
sampling from it), logits_cache (its logits on disk), distiller (the two stages), plot.
"""

from zoo.train.distill.config import (
    DistillRunConfig,
    DistillSection,
    StudentSection,
    TeacherSection,
    TransferSection,
    distill_config_from_dict,
    load_distill_config,
)
from zoo.train.distill.distiller import Distiller, build_student, perplexity
from zoo.train.distill.logits_cache import TeacherLogitsCache
from zoo.train.distill.plot import plot_distill
from zoo.train.distill.teacher import Teacher, load_teacher, teacher_generate

__all__ = [
    "DistillRunConfig", "DistillSection", "Distiller", "StudentSection", "Teacher",
    "TeacherLogitsCache", "TeacherSection", "TransferSection", "build_student",
    "distill_config_from_dict", "load_distill_config", "load_teacher", "perplexity",
    "plot_distill", "teacher_generate",
]
