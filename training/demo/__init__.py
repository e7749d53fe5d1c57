"""The demo model's world: a synthetic captioned dataset of coloured shapes (`shapes`) and a classifier that
checks generated images against their prompts with plain geometry and colour statistics (`evaluate`)."""
