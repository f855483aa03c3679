"""Fine-tune Llama 2 (LoRA, QLoRA or full) on instruction, chat or plain-text data: ``python -m kollama.train``.

  python -m kollama.train --ckpt_dir llama-2-7b --tokenizer_path tokenizer.model --data kullm-v2.jsonl \\
      --template kullm --method lora --out_dir runs/kullm-lora
  python -m kollama.train --config run.yaml [--lr 1e-4 ...]       # a config file, flags override it
  torchrun --nproc_per_node 4 -m kollama.train ... [--model_parallel_size 2]   # world = data x model parallel

The package, by concern:
  config.py         TrainConfig: every option (type, default, doc), config files, validation, resume rules
  recipe.py         TrainRecipe: setup → data → model → optimizer → resume or start → loop → finish;
                    ``train()``
  optim.py          the loss's normalisation, AdamW parameter groups, the learning-rate schedule
  plan.py           the data order of a plain run (epochs); stages.py: curriculum stages (a stage list / file)
  pretrain.py       continued pretraining: the trainable sets of ``--trainable``, held-out bits per character
  loading.py        the base model on this process (dense, NF4, or its FSDP shard); fsdp.py: FSDP2
  distributed.py    gradient all-reduce and the global gradient norm (data / model parallel, FSDP)
  checkpointing.py  trainer checkpoints (manifests, verified resume, quarantine) and the final outputs
  run_folder.py     a new run never starts over an old one; progress.py: the progress bar and printing
"""
from kollama.train.config import ConfigError, TrainConfig
from kollama.train.distributed import clip_grad_norm
from kollama.train.optim import lr_lambda, token_loss
from kollama.train.recipe import TrainRecipe, train

__all__ = ["TrainConfig", "ConfigError", "TrainRecipe", "train", "token_loss", "lr_lambda", "clip_grad_norm"]
