"""A local web app over both backends: text to image, image to image, inpainting with a brush,
and the denoising shown as it runs (then a slider back through the steps).

    python app.py --model runs/shapes                                   # after `make demo`
    python app.py --model stabilityai/stable-diffusion-3.5-medium       # the SD3 bridge
    python app.py --host 0.0.0.0 --port 7860                            # serve the network (a warning says so)

Needs Gradio: pip install -e '.[app]'. The handlers live in minidiff/tools/webapp.py.
"""

from __future__ import annotations

import argparse
import sys

from minidiff.tools.cli import DEFAULT_MODEL, ArgumentParser, UsageError, run


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a folder written by train.py, or an SD3 model: Hugging Face id or diffusers folder")
    p.add_argument("--backend", choices=["auto", "minidiff", "sd3"], default="auto",
                   help="auto: a hub id or a folder with model_index.json is sd3, anything else minidiff")
    p.add_argument("--device", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--out", default=None, help="folder for the result PNGs (default: a new temporary folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the app needs Gradio: pip install -e '.[app]'") from None
    from minidiff.tools.webapp import PAGE_CSS, AppModel, WebApp, build_ui, host_warning

    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    model = AppModel.load(args.model, args.backend, args.device)  # a bad model: one line, exit 2
    print(f"loaded {model.name} ({model.backend})", file=sys.stderr)
    demo = build_ui(WebApp(model, args.out, args.device))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False,
                footer_links=["api", "gradio"], css=PAGE_CSS)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
