from preble_hpc.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
