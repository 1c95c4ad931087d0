"""Krita actions: Tools > Scripts > sdcore Generate / Cancel (they drive the docker)."""

from __future__ import annotations

from krita import Extension, Krita


class SdcoreExtension(Extension):
    def setup(self) -> None:
        pass

    def createActions(self, window: object) -> None:  # noqa: N802 - Krita's API
        generate = window.createAction("sdcore_generate", "sdcore: Generate", "tools/scripts")  # type: ignore[attr-defined]
        generate.triggered.connect(lambda: self._docker_call("generate"))
        cancel = window.createAction("sdcore_cancel", "sdcore: Cancel", "tools/scripts")  # type: ignore[attr-defined]
        cancel.triggered.connect(lambda: self._docker_call("cancel"))

    def _docker_call(self, name: str) -> None:
        window = Krita.instance().activeWindow()
        for docker in window.dockers() if window else []:
            if docker.objectName() == "sdcoreDocker" or type(docker).__name__ == "SdcoreDocker":
                if name == "generate":
                    docker.generate()
                else:
                    docker.controller.cancel()
