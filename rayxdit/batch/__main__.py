import sys

from rayxdit.batch.job import main

sys.exit(main())
