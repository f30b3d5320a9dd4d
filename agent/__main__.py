from agent.fastrun import main

raise SystemExit(main())
