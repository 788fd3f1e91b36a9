import sys

from deepnoise.cli import main

sys.exit(main())
