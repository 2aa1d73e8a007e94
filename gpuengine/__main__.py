from gpuengine.cli import main

main()
