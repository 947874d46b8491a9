import sys

from soundreactor.cli import main

sys.exit(main())
