"use strict";
module.exports = "ws://127.0.0.1:7862";
