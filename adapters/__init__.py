"""The ship layer: merge, export, chat, predict and the demos, on top of `finetune`.

`finetune` is imported first so that its check of the installed transformers/peft/accelerate/trl runs before
any of them is: `python -m adapters.X` on an untested release prints the refusal, not an import crash inside
one of those libraries.
"""

import finetune  # noqa: F401  (the version check; light: no torch)
