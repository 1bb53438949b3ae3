"""The models: built-in backbones and their heads, base checkpoints, base/original/adapted assembly."""
