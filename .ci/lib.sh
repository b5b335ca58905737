# Shared by the CI jobs (.ci/run, .ci/run-floor, .ci/run-newest); sourced, never run.

# ci_python VERSION: print the path of a working pythonVERSION interpreter, or fail loudly.
# Looks at CI_PYTHON_<MAJOR><MINOR> (e.g. CI_PYTHON_310), then pythonVERSION on PATH, then the
# pyenv installs under ${PYENV_ROOT:-$HOME/.pyenv}. A missing interpreter fails the job: a
# supported version that CI cannot test is an error, never a skip.
ci_python() {
    local version=$1 var="CI_PYTHON_${1//./}" candidate
    local -a candidates=()
    [[ -n "${!var:-}" ]] && candidates+=("${!var}")
    candidates+=("python$version")
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/"python$version"; do
        [[ -x "$candidate" ]] && candidates+=("$candidate")
    done
    for candidate in "${candidates[@]}"; do
        if "$candidate" -c "import sys, venv; assert sys.version_info[:2] == tuple(map(int, '$version'.split('.')))" \
            >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "ci: FAILED: no Python $version interpreter (tried: ${candidates[*]}); install one or" \
         "set $var to its path" >&2
    return 1
}

# ci_time LABEL COMMAND...: run COMMAND, then append "LABEL SECONDS" to $CI_TIMINGS.
ci_time() {
    local label=$1 start=$SECONDS
    shift
    "$@"
    echo "$label $((SECONDS - start))" >>"$CI_TIMINGS"
}

# ci_versions PYTHON: print the interpreter, torch and numpy versions a job runs on.
ci_versions() {
    "$1" -c "import sys, torch, numpy; print('ci: python', sys.version.split()[0], '| torch',
torch.__version__, '| numpy', numpy.__version__)"
}

# The tests the floor and newest jobs run: everything in the default selection (not -m slow)
# except the SIGKILL crash loops and the soak of the single-process writer, which spend their
# time in processes and the filesystem rather than in torch; the main job runs those.
CI_VERSION_TESTS=(
    tests
    --ignore tests/integration/test_crash.py
    --ignore tests/integration/test_crash_journal.py
    --ignore tests/integration/test_soak.py
)

# ci_version_job NAME PYTHON_VERSION CONSTRAINTS: a fresh venv .venv-NAME on that Python, torch
# from CONSTRAINTS installed first (pinning torch and the test extra in one pip call sends pip's
# resolver backtracking for many minutes), then the package with its test extra, then the tests.
# Fails if the interpreter is missing or torch is not the pinned release.
ci_version_job() {
    local name=$1 version=$2 constraints=$3 python venv=".venv-$1" pin
    echo "ci: job $name: Python $version, $(grep '^torch==' "$constraints")"
    python=$(ci_python "$version")
    pin=$(sed -n 's/^torch==//p' "$constraints")
    rm -rf "$venv"
    ci_time "$name:install" _ci_install "$python" "$venv" "$constraints"
    ci_versions "$venv/bin/python"
    "$venv/bin/python" -c "import sys, torch; v = torch.__version__.split('+')[0]
sys.exit(0 if v == '$pin' else f'ci: FAILED: torch {v} is installed, $constraints pins $pin')"
    ci_time "$name:tests" "$venv/bin/python" -m pytest -q "${CI_VERSION_TESTS[@]}"
}

_ci_install() {
    local python=$1 venv=$2 constraints=$3
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q -c "$constraints" torch
    "$venv/bin/pip" install -q -c "$constraints" -e '.[test]'
}
