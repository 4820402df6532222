from preble_hpc._proto import generate, repo_root

for path in generate(repo_root()):
    print("wrote", path.relative_to(repo_root()))
