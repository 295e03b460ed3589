"""The exceptions users see: a bad input, explained (one line, exit code 2), and a training stopped by a signal.

Nothing here imports the training stack: the CLI catches these for every verb, and a launching parent must start
torchrun without first importing what each process imports again (transformers, peft, bitsandbytes: ~7 s on CPU)."""


class UserError(Exception):
    """A problem with the user's input (file, config, data, run directory) that they can fix.

    The message names the file (and line) and the field, and says what to do. No traceback is shown unless `--debug`.
    """


class Stopped(UserError):
    """Training stopped on a signal after writing a checkpoint; the exit code is the shell's 128 + signal."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class OutOfMemory(UserError):
    """The GPU ran out of memory during training: the message says what fits (exit code 2). Printed by every process
    that meets it: under torchrun one GPU may fill before the others, and its process alone knows."""
