""" Command-line helpers shared by the bench/ scripts """
import argparse
from typing import Tuple


def model_config(parser: argparse.ArgumentParser, option: str, text: str) -> Tuple[str, int, int]:
    """(model name, image size, batch size) from a 'model:img_size:batch_size' value of `option`; anything else exits
    through parser.error (status 2, with the option and the value in the message)."""
    try:
        name, img, batch = text.split(':')
        return name, int(img), int(batch)
    except ValueError:
        parser.error(f'{option} must be model:img_size:batch_size (e.g. resnet18:64:64), got {text!r}')
