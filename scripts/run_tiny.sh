#!/usr/bin/env bash
# The main job on the tiny CPU default: tokenizer, then pretraining on WikiText.
# Extra --section.field=value flags are passed to every step (CI uses --train.steps=5).
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
CONFIG="${FLAN_CONFIG:-configs/tiny.toml}"
python -m flan tokenizer train "$CONFIG" "$@"
python -m flan pretrain "$CONFIG" "$@"
