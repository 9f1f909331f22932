#!/usr/bin/env python
"""Django's command-line utility, which stops with one clear line on a bad setting."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "millm_site.settings")
    from django.core.management import execute_from_command_line

    from millm_site.env import SettingError

    try:
        execute_from_command_line(sys.argv)
    except SettingError as exc:
        sys.stderr.write(f"miLLM configuration error: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
