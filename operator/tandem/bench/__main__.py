from tandem.bench.cli import main

raise SystemExit(main())
