"""The sdcore docker: server address and token, prompt and settings, Generate / Cancel, a progress bar."""

from __future__ import annotations

from krita import DockWidget, Krita
from PyQt5.QtCore import QSettings, QTimer
from PyQt5.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .controller import Controller, KritaBridgeError
from .worker import BridgeWorker


class SdcoreDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("sdcore")
        self.settings = QSettings("sdcore", "krita")
        root = QWidget(self)
        layout = QVBoxLayout(root)
        form = QFormLayout()
        self.server = QLineEdit(self.settings.value("server", "ws://127.0.0.1:7862"))
        self.token = QLineEdit(self.settings.value("token", ""))
        self.token.setEchoMode(QLineEdit.Password)
        self.connect_button = QPushButton("Connect")
        row = QHBoxLayout()
        row.addWidget(self.server)
        row.addWidget(self.connect_button)
        form.addRow("Server", row)
        form.addRow("Token", self.token)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Prompt")
        self.negative = QPlainTextEdit()
        self.negative.setPlaceholderText("Negative prompt")
        self.negative.setMaximumHeight(60)
        self.model = QComboBox()
        self.steps = QSpinBox()
        self.steps.setRange(1, 150)
        self.steps.setValue(20)
        self.strength = QDoubleSpinBox()
        self.strength.setRange(0.0, 1.0)
        self.strength.setSingleStep(0.05)
        self.strength.setValue(0.75)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(-1)
        self.use_selection = QCheckBox("Use the selection (inpaint it)")
        self.use_selection.setChecked(True)
        self.txt2img = QCheckBox("Ignore the canvas (txt2img)")
        layout.addLayout(form)
        layout.addWidget(self.prompt)
        layout.addWidget(self.negative)
        settings = QFormLayout()
        settings.addRow("Model", self.model)
        settings.addRow("Steps", self.steps)
        settings.addRow("Strength", self.strength)
        settings.addRow("Seed", self.seed)
        layout.addLayout(settings)
        layout.addWidget(self.use_selection)
        layout.addWidget(self.txt2img)
        buttons = QHBoxLayout()
        self.generate_button = QPushButton("Generate")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        layout.addWidget(self.progress)
        self.status = QLabel("Not connected.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.setWidget(root)

        self.worker = BridgeWorker()
        self.controller = Controller(self.worker, status=self.status.setText,
                                     progress=lambda f: self.progress.setValue(int(f * 1000)), done=self._done)
        self.connect_button.clicked.connect(self.connect_server)
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button.clicked.connect(self.controller.cancel)
        self.timer = QTimer(self)
        self.timer.timeout.connect(self._poll)
        self.timer.start(50)

    def canvasChanged(self, canvas: object) -> None:  # noqa: N802 - Krita's API
        pass

    def connect_server(self) -> None:
        self.settings.setValue("server", self.server.text())
        self.settings.setValue("token", self.token.text())
        self.controller.connect(self.server.text().strip(), self.token.text().strip() or None)

    def generate(self) -> None:
        if self.controller.welcome is None:
            self.connect_server()
        settings = {"prompt": self.prompt.toPlainText(), "negative_prompt": self.negative.toPlainText(),
                    "steps": self.steps.value(), "denoising_strength": self.strength.value(),
                    "seed": self.seed.value(), "model": self.model.currentData()}
        try:
            self.controller.generate(Krita.instance().activeDocument(), settings,
                                     use_selection=self.use_selection.isChecked(), txt2img=self.txt2img.isChecked())
        except KritaBridgeError as exc:
            self.status.setText(str(exc))
            return
        self.cancel_button.setEnabled(True)

    def _poll(self) -> None:
        had_models = len(self.controller.models)
        self.controller.poll()
        if self.controller.models and self.model.count() != len(self.controller.models) or (
                had_models == 0 and self.controller.models):
            self.model.clear()
            for m in self.controller.models:
                self.model.addItem(m["name"], m["path"] if m.get("default") else m["name"])

    def _done(self, nodes: list[object]) -> None:
        self.cancel_button.setEnabled(self.controller.current is not None)
