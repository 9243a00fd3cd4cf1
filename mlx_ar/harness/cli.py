"""`mlx-ar train`: the same as `python train.py`, for the train.py in the current directory."""
import click


@click.command("train", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--train-file", default="train.py", show_default=True, help="the experiment file")
def train_command(args, train_file):
    """Run one experiment (options as `python train.py --help`)."""
    from .main import run

    raise SystemExit(run(train_file, list(args), prog="mlx-ar train"))
