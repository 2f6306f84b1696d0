"""A fake ``lfs`` for the Lustre tests: ``setstripe``, ``getstripe`` and ``osts``.

It keeps each file's layout in ``$FAKE_LFS_STATE/layouts/<base name>.json``
and logs every call (its arguments, one JSON list per line) to
``$FAKE_LFS_STATE/calls.jsonl``.  ``$FAKE_LFS_OSTS`` OSTs (default 4);
``$FAKE_LFS_SIZE`` forces the stripe size a file gets (as a Lustre pool or
a filesystem limit would); ``$FAKE_LFS_FAIL`` makes ``setstripe`` fail with
that message.  A directory's default is 1 MiB x 1.
"""

import json
import os
import sys


def main(argv: list[str]) -> int:
    state = os.environ["FAKE_LFS_STATE"]
    os.makedirs(os.path.join(state, "layouts"), exist_ok=True)
    with open(os.path.join(state, "calls.jsonl"), "a") as log:
        log.write(json.dumps(argv) + "\n")
    osts = int(os.environ.get("FAKE_LFS_OSTS", "4"))
    command, args = argv[0], argv[1:]
    if command == "osts":
        print("OBDS:")
        for index in range(osts):
            print(f"{index}: fake-OST{index:04x}_UUID ACTIVE")
        return 0
    path = args[-1]
    where = os.path.join(state, "layouts", os.path.basename(path) + ".json")
    if command == "setstripe":
        options = dict(zip(args[:-1:2], args[1:-1:2], strict=True))
        if os.environ.get("FAKE_LFS_FAIL"):
            print(f"lfs setstripe: setstripe error for '{path}': {os.environ['FAKE_LFS_FAIL']}", file=sys.stderr)
            return 1
        if os.path.lexists(path):
            print(f"lfs setstripe: setstripe error for '{path}': File exists", file=sys.stderr)
            return 17
        count = int(options["-c"])
        if count > osts:
            print(f"lfs setstripe: invalid stripe count {count}: Invalid argument", file=sys.stderr)
            return 22
        layout = {"count": osts if count == -1 else count,
                  "size": int(os.environ.get("FAKE_LFS_SIZE") or options["-S"]),
                  "offset": int(options.get("-i", -1))}
        with open(where, "w") as out:
            json.dump(layout, out)
        open(path, "x").close()
        return 0
    if command == "getstripe":
        layout = {"count": 1, "size": 1 << 20}
        if os.path.exists(where) and "-d" not in args:
            with open(where) as held:
                layout = json.load(held)
        print(layout["size"] if "--stripe-size" in args else layout["count"])
        return 0
    print(f"fake lfs: {command} is not faked", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
