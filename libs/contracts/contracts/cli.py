"""What the command-line tools share."""

from __future__ import annotations

import argparse
from typing import Any

# Where Once notes the options it has stored.
_GIVEN = "_options_given"


class Once(argparse.Action):
    """Stores an option's value, and refuses the option given a second time:
    argparse would keep the last one and act on it alone, silently."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, _GIVEN, set())
        if self.dest in given:
            raise argparse.ArgumentError(
                self,
                "given more than once, but it takes one value: run the command once "
                "for each",
            )
        setattr(namespace, _GIVEN, given | {self.dest})
        setattr(namespace, self.dest, values)
