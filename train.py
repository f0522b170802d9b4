"""Train from a recipe: `accelerate launch train.py recipes/<recipe>.yaml [key=value ...]`.

With no arguments it runs the embedded default, the tiny CPU demo (`cogtune demo`).
"""

import sys

if __name__ == "__main__":
    if len(sys.argv) == 1:
        from adapters.demo import main as demo_main

        raise SystemExit(demo_main([]))
    from finetune.recipe import main

    raise SystemExit(main())
