"""Train from a recipe: `accelerate launch train.py recipes/<recipe>.yaml [key=value ...]`."""

from finetune.recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
