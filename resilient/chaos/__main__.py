from resilient.chaos.cli import main
import sys
sys.exit(main())
