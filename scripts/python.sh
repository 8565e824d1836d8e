# Sourced by the scripts: choose the Python interpreter the project runs with.
#   an active virtualenv          -> its python3
#   a .venv made by scripts/setup -> .venv/bin/python (Debian's python3 refuses pip, PEP 668)
#   otherwise                     -> python3
project_python() {
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        echo python3
    elif [ -x .venv/bin/python ]; then
        echo .venv/bin/python
    else
        echo python3
    fi
}
