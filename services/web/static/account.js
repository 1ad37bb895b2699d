// The account pages' copy buttons: copy the text of the element named in data-copy.
"use strict";
document.querySelectorAll("button[data-copy]").forEach((button) => {
  button.hidden = false;
  button.addEventListener("click", async () => {
    const source = document.getElementById(button.dataset.copy);
    const status = document.getElementById(button.dataset.copy + "-status");
    try {
      await navigator.clipboard.writeText(source.textContent);
      status.textContent = "Copied.";
    } catch (e) {
      // No clipboard permission: select it, so Ctrl+C / Cmd+C copies it.
      const range = document.createRange();
      range.selectNodeContents(source);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      status.textContent = "Selected: press Ctrl+C (Cmd+C on a Mac) to copy.";
    }
  });
});
