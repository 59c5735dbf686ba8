"""The installed package's commands: each runs one `*_main.py` program.

`pip install .` installs the programs as top-level modules (`train_main`, ...) and these
functions as the commands `glam-train`, `glam-eval`, `glam-export`, `glam-build-gldv2`,
`glam-make-synthetic`, `glam-download` and `glam-build-index` (pyproject.toml). A command
runs its program exactly as `python train_main.py ...` does: the module executed as
`__main__`, so its `if __name__ == "__main__":` block parses the command line (help and
errors name the command) and the programs stay the one place that reads flags.
"""

import runpy

PROGRAMS = {
    "glam-train": "train_main",
    "glam-eval": "eval_main",
    "glam-export": "export_main",
    "glam-build-gldv2": "build_gldv2_main",
    "glam-make-synthetic": "make_synthetic_main",
    "glam-download": "download_main",
    "glam-build-index": "build_index_main",
}


def run_program(module: str) -> None:
    """Executes the program `module` (e.g. "train_main") as `__main__`."""
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
    run_program(PROGRAMS["glam-train"])


def evaluate() -> None:
    run_program(PROGRAMS["glam-eval"])


def export() -> None:
    run_program(PROGRAMS["glam-export"])


def build_gldv2() -> None:
    run_program(PROGRAMS["glam-build-gldv2"])


def make_synthetic() -> None:
    run_program(PROGRAMS["glam-make-synthetic"])


def download() -> None:
    run_program(PROGRAMS["glam-download"])


def build_index() -> None:
    run_program(PROGRAMS["glam-build-index"])
