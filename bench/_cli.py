""" Command-line helpers shared by the bench/ scripts """
import argparse
from typing import Any, Dict, Tuple


def model_config(parser: argparse.ArgumentParser, option: str, text: str) -> Tuple[str, int, int]:
    """(model name, image size, batch size) from a 'model:img_size:batch_size' value of `option`; anything else exits
    through parser.error (status 2, with the option and the value in the message)."""
    try:
        name, img, batch = text.split(':')
        return name, int(img), int(batch)
    except ValueError:
        parser.error(f'{option} must be model:img_size:batch_size (e.g. resnet18:64:64), got {text!r}')


def split_dbp_settings(settings: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model kwargs, optimizer kwargs) from --dbp key=value pairs: dbp_* keys are the model's."""
    model_kwargs = {k: v for k, v in settings.items() if k.startswith('dbp_')}
    return model_kwargs, {k: v for k, v in settings.items() if k not in model_kwargs}
