import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { ActivePoolModel } from './model';
import { PoolPanel } from './panel';
import { PoolStatusItem } from './statusitem';
import { PoolToolbarItem } from './toolbaritem';

const POOL_ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161">' +
  '<rect x="2" y="2" width="9" height="9" rx="2"/>' +
  '<rect x="13" y="2" width="9" height="9" rx="2"/>' +
  '<rect x="2" y="13" width="9" height="9" rx="2"/>' +
  '<rect x="13" y="13" width="9" height="9" rx="2" opacity="0.45"/>' +
  '</g></svg>';

/** The side panel's icon: four workers, one of them starting. */
export const poolIcon = new LabIcon({
  name: 'dspool-jupyter:pool',
  svgstr: POOL_ICON_SVG
});

/** Command ids. */
export namespace CommandIDs {
  export const openPanel = 'dspool:open-panel';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'dspool-jupyter:plugin',
  description:
    "Shows the dspool worker pool of the active notebook's kernel in the status bar and a side panel.",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ): void => {
    const model = new ActivePoolModel(tracker);

    const panel = new PoolPanel(model);
    panel.title.icon = poolIcon;
    app.shell.add(panel, 'right', { rank: 900 });
    restorer?.add(panel, 'dspool-panel');

    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show dspool Pool Panel',
      caption: "Open the panel with the active notebook's worker pool",
      execute: () => {
        app.shell.activateById(panel.id);
      }
    });
    palette?.addItem({ command: CommandIDs.openPanel, category: 'dspool' });

    if (!statusBar) {
      // Notebook 7 has no status bar: each notebook's toolbar shows the pool instead
      const addToolbarItem = (notebook: NotebookPanel): void => {
        const item = new PoolToolbarItem(model.connectionFor(notebook), () => {
          void app.commands.execute(CommandIDs.openPanel);
        });
        notebook.toolbar.insertItem(10, 'dspool', item);
      };
      tracker.forEach(addToolbarItem);
      tracker.widgetAdded.connect((_sender, notebook) =>
        addToolbarItem(notebook)
      );
    }

    if (statusBar) {
      const item = new PoolStatusItem(model, () => {
        void app.commands.execute(CommandIDs.openPanel);
      });
      statusBar.registerStatusItem('dspool-jupyter:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => model.status !== null,
        activeStateChanged: model.changed
      });
    }
  }
};

export default plugin;
