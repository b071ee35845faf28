import sys

from facecal.cli import main

sys.exit(main())
