"""`python -m benchmarks` == `latent-stream bench`."""

import typer

from benchmarks.cli import bench

if __name__ == "__main__":
    typer.run(bench)
