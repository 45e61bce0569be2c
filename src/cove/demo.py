"""A short tour of cove, run by `cove serve --demo` against the server it just started."""

from __future__ import annotations

from rich.console import Console

from cove.sdk import Sandbox


def run_demo(url: str, api_key: str | None) -> None:
    console = Console(stderr=False)
    console.rule("[bold]cove demo")
    with Sandbox.create(url=url, api_key=api_key, metadata={"purpose": "demo"}) as sb:
        console.print(f"created sandbox [cyan]{sb.id}[/] (namespaces runtime)")
        r = sb.exec("python3 -c 'print(6*7)'")
        console.print(f"$ python3 -c 'print(6*7)'  ->  [green]{r.stdout.strip()}[/] (exit {r.exit_code})")
        r = sb.exec("id; hostname; ps -e -o pid,comm | head -5")
        console.print("$ id; hostname; ps -e\n" + r.stdout.rstrip())
        sb.files.write("/home/user/hello.py", "import platform\nprint('hello from', platform.node())\n")
        console.print("$ python3 hello.py  ->  " + sb.exec("python3 hello.py").stdout.strip())
        r = sb.exec("tail -n +3 /proc/net/dev | cut -d: -f1; tail -n +2 /proc/net/route | wc -l")
        ifaces, routes = r.stdout.split()[:-1], r.stdout.split()[-1]
        console.print(f"network is off by default: interfaces {ifaces}, {routes} routes")
    console.print(f"killed sandbox {sb.id}; the server keeps running at [cyan]{url}[/] (Ctrl-C to stop)")
    console.rule()
